//! The cpu paths' f32 math: the branch-free functions, lane sums and the `multiversion` macro
//! live in `reclmis-cpu-loops` (with the hot loops that use them, built at opt-level 3 even in
//! the size profile); the allocation helpers that know about the tests' poison switch stay here.

pub use reclmis_cpu_loops::math::*;
pub(crate) use reclmis_cpu_loops::multiversion;

/// A new output of n f32 that its writers fill completely before anyone reads it, allocated
/// without the zeroing pass of `vec![0.0; n]` (which runs on the calling thread alone and, for
/// memory-bound ops, costs as much as the op: a fifth of an attention step at the CLIP tower's
/// sizes). Under the tests' poison switch it starts as NaN instead, so an element the writers
/// miss fails the comparison.
pub(crate) struct Unfilled(Vec<f32>, usize);

impl Unfilled {
    pub(crate) fn new(n: usize) -> Unfilled {
        if crate::device::poison_enabled() {
            Unfilled(vec![f32::NAN; n], n)
        } else {
            Unfilled(Vec::with_capacity(n), n)
        }
    }

    /// Room for n floats (write through raw pointers only: they may be uninitialised).
    pub(crate) fn ptr(&mut self) -> SendPtr {
        SendPtr(self.0.as_mut_ptr())
    }

    /// The n floats as slots to write.
    pub(crate) fn slots(&mut self) -> &mut [std::mem::MaybeUninit<f32>] {
        // SAFETY: the Vec has capacity for n floats; MaybeUninit<f32> has f32's layout and does
        // not assume them initialised; only initialised values are written through it.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut std::mem::MaybeUninit<f32>, self.1) }
    }

    /// SAFETY: every element of 0..n has been written through `ptr` or `slots`.
    pub(crate) unsafe fn filled(mut self) -> Vec<f32> {
        self.0.set_len(self.1);
        self.0
    }
}

/// Makes `buf` (a scratch buffer whose users overwrite what they read) hold at least n floats:
/// a shorter one is replaced by a fresh zeroed allocation (calloc, whose pages the kernel zeroes
/// on first touch) instead of `resize`, whose fill loop runs one float at a time in the size
/// profile (4 % of the official preset's first mask there).
pub(crate) fn grow(buf: &mut Vec<f32>, n: usize) {
    if buf.len() < n {
        *buf = vec![0.0; n];
    }
}

/// task(t) for t in 0..n over the rayon threads, through one instantiation for every caller
/// (the task behind a `dyn`): each generic parallel loop costs the size-budgeted reclmis-infer
/// a KB or more (the PLAM gate's phases as generic loops: 5.7 KB).
pub(crate) fn par_tasks(n: usize, task: &(dyn Fn(usize) + Sync)) {
    use rayon::prelude::*;
    (0..n).into_par_iter().for_each(task);
}

/// A new Vec of n f32 that `fill(chunk_index, chunk)` writes completely, chunk by chunk in
/// parallel (rayon), without a zeroing pass (`Unfilled`).
pub fn par_new(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = Unfilled::new(n);
    out.slots().par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| fill(i, c));
    // SAFETY: `fill` wrote every element of every chunk (its contract); the chunks cover 0..n.
    unsafe { out.filled() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / (want * f32::EPSILON as f64));
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        for x in [88.0f32, 88.5, 88.7] {
            // n = 128 takes the 2 · 2^127 path
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 2.0 * want * f32::EPSILON as f64, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(super::exp(100.0), f32::INFINITY);
        assert_eq!(super::exp(-100.0), 0.0);
        assert!(super::exp(f32::NAN).is_nan());
        assert_eq!(super::exp(0.0), 1.0);
    }

    #[test]
    fn normal_cdf_is_within_four_ulp_relative_of_f64() {
        // Φ from erfc in f64: 0.5·erfc(−x/√2)
        let mut worst = 0.0f64;
        let mut x = -12.0f32;
        while x < 6.0 {
            let want = 0.5 * libm::erfc(-(x as f64) / std::f64::consts::SQRT_2);
            let got = super::normal_cdf(x) as f64;
            worst = worst.max((got - want).abs() / (want * f32::EPSILON as f64));
            x += 0.00731;
        }
        // erfcc's 1.2e-7 fit error (2 ulp) and exp's 2 ulp
        assert!(worst <= 4.0, "worst error {worst} ulp");
    }

    #[test]
    fn log1p_unit_is_within_two_ulp_of_f64() {
        let mut worst = 0.0f64;
        for i in 0..=100_000 {
            let u = i as f32 / 100_000.0;
            let u = if i % 7 == 0 { u * 1e-6 } else { u };
            let (got, want) = (super::log1p_unit(u) as f64, (u as f64).ln_1p());
            if want > 0.0 {
                worst = worst.max((got - want).abs() / (want * f32::EPSILON as f64));
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(super::log1p_unit(0.0), 0.0);
    }
}
