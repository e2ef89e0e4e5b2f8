//! Branch-free f32 math for the cpu paths, written so that loops calling it auto-vectorise
//! (libm's expf is a scalar call and made softmax 7x slower than PyTorch).

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n · LN2_HI is exact for |n| < 2^9 (Cody–Waite range reduction).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding and subtracting it rounds an f32 to the nearest integer.
const ROUND: f32 = 12_582_912.0;

/// e^x within 2 ulp over the normal range. Results that would be subnormal (x < -87.3) are
/// flushed to 0 (an absolute error below 1.2e-38); x > 88.72 gives +inf; NaN propagates.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.33, 88.72);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Minimax polynomial for e^r on [-ln2/2, ln2/2] (Cephes expf coefficients).
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from the bits: t's mantissa holds n exactly (its ulp is 1), so no float-to-int
    // conversion (which LLVM does not vectorise with Rust's saturating `as`). n is in [-126, 128]
    // after the clamp; 2^128 is not an f32, so n = 128 is done as 2 · 2^127.
    let i = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let top = i == 128;
    let scale = f32::from_bits(((if top { 127 } else { i }) + 127) as u32 * (1 << 23));
    let e = if top { e * 2.0 } else { e };
    let y = e * scale;
    if x > 88.72 {
        f32::INFINITY
    } else if x < -87.33 {
        0.0
    } else {
        y
    }
}

/// ln(1 + u) for u in [0, 1], within 2 ulp; vectorises (libm's log1pf is a scalar call).
/// The rounding of 1 + u is corrected with the classic log1p(u) = ln(w) · u / (w − 1), w = 1 + u.
#[inline(always)]
pub fn log1p_unit(u: f32) -> f32 {
    let w = 1.0 + u;
    // w in [1, 2]: w = m · 2^e with m in [1/√2, √2) (Cephes logf range reduction)
    let big = w > std::f32::consts::SQRT_2;
    let (m, e) = if big { (w * 0.5, 1.0f32) } else { (w, 0.0) };
    let x = m - 1.0;
    let z = x * x;
    let p = 7.037_683_6e-2_f32;
    let p = p * x - 1.151_461_1e-1;
    let p = p * x + 1.167_699_9e-1;
    let p = p * x - 1.242_014_1e-1;
    let p = p * x + 1.424_932_3e-1;
    let p = p * x - 1.666_805_8e-1;
    let p = p * x + 2.000_071_5e-1;
    let p = p * x - 2.499_999_4e-1;
    let p = p * x + 0.333_333_34;
    let y = p * x * z + e * LN2_LO - 0.5 * z;
    let ln_w = x + y + e * LN2_HI;
    let d = w - 1.0;
    if d == 0.0 {
        u
    } else {
        ln_w * (u / d)
    }
}

/// Runs `$body` (a closure-free block that calls only `#[inline(always)]` helpers) compiled three
/// times: for AVX-512, for AVX2+FMA and for the baseline, choosing at run time. The binary stays
/// portable (the GPU machine's CPU differs from the build machine's) while hot loops use the
/// widest vectors the CPU has.
/// `unsafe fn` works too: a loop that writes through raw pointers (`SendPtr`) has its callers
/// promise where, and says so in a `# Safety` section.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $crate::multiversion!(@dispatch ($($arg: $ty),*) ($($ret)?) $body);
            $body
        }
    };
    ($(#[$m:meta])* $vis:vis unsafe fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
            $crate::multiversion!(@dispatch ($($arg: $ty),*) ($($ret)?) $body);
            $body
        }
    };
    (@dispatch ($($arg:ident: $ty:ty),*) ($($ret:ty)?) $body:block) => {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            unsafe fn v4($($arg: $ty),*) $(-> $ret)? $body
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3($($arg: $ty),*) $(-> $ret)? $body
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl") {
                // SAFETY: the CPU has the features v4 was compiled for (and an unsafe function's
                // contract is its caller's, as for the baseline body).
                return unsafe { v4($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { v3($($arg),*) };
            }
        }
    };
}

/// A raw pointer into an output that several rayon tasks write at once, each its own disjoint
/// elements (the callers' SAFETY comments say which), and that nothing reads until they are all
/// done: the one thing that makes sharing it between threads sound.
pub struct SendPtr<T = f32>(pub *mut T);

// Manual impls: a derive would require T: Copy, but the pointer is Copy whatever T is.
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

// SAFETY: see the type's doc: every task writes disjoint elements, none reads another's.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the Sync wrapper, not its field).
    pub fn get(&self) -> *mut T {
        self.0
    }

    /// The element at `off`.
    ///
    /// # Safety
    /// `off` must stay inside the buffer the pointer came from (`pointer::add`'s contract).
    pub unsafe fn at(&self, off: usize) -> *mut T {
        // SAFETY: the caller keeps `off` inside the buffer.
        unsafe { self.0.add(off) }
    }
}

/// The max / argmax rule of the kernels (common.cuh `max_better`, reduce.cu): is value v at index
/// i better than the best so far? NaN wins; among equal values the lowest index wins.
#[inline(always)]
pub fn max_better(v: f32, i: usize, best: f32, bi: usize) -> bool {
    if v.is_nan() != best.is_nan() {
        return v.is_nan();
    }
    if v.is_nan() || v == best {
        return i < bi;
    }
    v > best
}

/// Accumulator lanes of the vectorisable sums: 16 f32 = one AVX-512 register (two AVX2 ones).
pub const LANES: usize = 16;

/// Σ x with LANES independent partial sums (a plain f32 sum is a serial dependency chain that
/// the compiler may not reorder, so it neither vectorises nor pipelines).
#[inline(always)]
pub fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let c = x.chunks_exact(LANES);
    let tail: f32 = c.remainder().iter().sum();
    for v in c {
        for l in 0..LANES {
            acc[l] += v[l];
        }
    }
    hsum(acc) + tail
}

/// Σ a·b with LANES independent partial sums.
#[inline(always)]
pub fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    hsum(acc) + tail
}

/// Σ (x − m)² with LANES independent partial sums, in the order of `dot_lanes` on the
/// differences (so a row's variance does not depend on whether they were stored first).
#[inline(always)]
pub fn sq_dev_lanes(x: &[f32], m: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let c = x.chunks_exact(LANES);
    let tail: f32 = c.remainder().iter().map(|&v| (v - m) * (v - m)).sum();
    for ch in c {
        for l in 0..LANES {
            let d = ch[l] - m;
            acc[l] += d * d;
        }
    }
    hsum(acc) + tail
}

/// The lanes' total by halving (four vector steps instead of a 16-add chain).
#[inline(always)]
pub fn hsum(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// erfc(|x|/√2), the normal tail, within a few ulp: Numerical Recipes' Chebyshev fit `erfcc`
/// (1.2e-7 relative) evaluated branch-free so that loops over it vectorise. Its exp(−x²/2 + p)
/// factor keeps the tail's relative accuracy (1 − erf would cancel), and the argument is carried
/// in two parts (x² split exactly by an FMA, the sum by 2Sum) because rounding an argument of −70
/// to f32 alone would cost 60 ulp of the result.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the published coefficients, as printed
pub fn normal_tail(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    // Horner with FMAs: call this from multiversioned (FMA-enabled) loops only; elsewhere
    // mul_add is a library call.
    let p = 0.170_872_77_f32.mul_add(t, -0.822_152_23);
    let p = p.mul_add(t, 1.488_515_9);
    let p = p.mul_add(t, -1.135_203_98);
    let p = p.mul_add(t, 0.278_868_07);
    let p = p.mul_add(t, -0.186_288_06);
    let p = p.mul_add(t, 0.096_784_18);
    let p = p.mul_add(t, 0.374_091_96);
    let p = p.mul_add(t, 1.000_023_68);
    let p = p.mul_add(t, -1.265_512_23);
    // −z² = −x²/2 = a + lo/2 exactly, with a = −hi/2
    let hi = x * x;
    let lo = x.mul_add(x, -hi);
    let a = -0.5 * hi;
    // s + e = a + p exactly (2Sum)
    let s = a + p;
    let bb = s - a;
    let e = (a - (s - bb)) + (p - bb);
    t * exp(s) * (1.0 + (e - 0.5 * lo))
}

/// Φ(x), the standard normal CDF: erfc(|x|/√2)/2 on the left, 1 − that on the right.
#[inline(always)]
pub fn normal_cdf(x: f32) -> f32 {
    let tail = 0.5 * normal_tail(x);
    if x < 0.0 {
        tail
    } else {
        1.0 - tail
    }
}
