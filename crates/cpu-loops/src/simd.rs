//! Explicit vectors of 16 f32, for the loops that must be fast even where the compiler will not
//! vectorise: a size-profile build (opt-level z) runs LLVM's link-time optimisation at z for the
//! whole program, with its vectorisers off, whatever this crate's own opt-level (measured: the
//! few-rows Linear stayed scalar and the official preset's first mask took 0.8 s instead of 0.5).
//!
//! A loop is written once, generic over [`Simd`], as a [`Kernel`]; [`dispatch`] runs it with
//! AVX-512, AVX2+FMA or plain scalar code, whichever the running CPU has. The vector types can
//! only be used through a token ([`V4`], [`V3`], [`Scalar`]) that exists only where the CPU has
//! its instructions, so the safe methods cannot execute an instruction the CPU lacks.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Operations on 16 f32 lanes (`Self::V`), through a token that proves the CPU has them.
pub(crate) trait Simd: Copy {
    type V: Copy;
    /// The plain-code path (`Scalar`): a kernel may run a smaller loop of the same arithmetic
    /// there instead of a register tile that only vector code needs.
    const SCALAR: bool = false;
    fn zero(self) -> Self::V;
    fn splat(self, x: f32) -> Self::V;
    /// The first 16 floats of s (panics if s is shorter).
    fn load(self, s: &[f32]) -> Self::V;
    /// # Safety
    /// 16 floats must be readable at p.
    unsafe fn load_ptr(self, p: *const f32) -> Self::V;
    /// Into the first 16 floats of d (panics if d is shorter).
    fn store(self, d: &mut [f32], v: Self::V);
    /// # Safety
    /// 16 floats must be writable at p.
    unsafe fn store_ptr(self, p: *mut f32, v: Self::V);
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// a·b + c rounded once (fused), the same bits on every path (the scalar one through
    /// `f32::mul_add`, correctly rounded in software where the CPU has no FMA).
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The first n <= 16 floats of s, zeros after (panics if s is shorter than n).
    fn load_first(self, s: &[f32], n: usize) -> Self::V;
    /// The first n <= 16 lanes to p (one masked store: a copy of run-time length is a call).
    ///
    /// # Safety
    /// n floats must be writable at p, and n <= 16.
    unsafe fn store_first_ptr(self, p: *mut f32, v: Self::V, n: usize);
    /// [a0, b0, a1, b1, ..., a7, b7] and [a8, b8, ..., a15, b15].
    fn interleave(self, a: Self::V, b: Self::V) -> (Self::V, Self::V);
    /// The even and the odd elements of [p, q] (32 floats): the inverse of `interleave`.
    fn deinterleave(self, p: Self::V, q: Self::V) -> (Self::V, Self::V);
    /// Whether any lane is NaN.
    fn any_nan(self, v: Self::V) -> bool;
    fn to_array(self, v: Self::V) -> [f32; 16];
}

/// A loop written once for every [`Simd`]; `run` must be `#[inline(always)]`, so that it is
/// compiled inside the target-feature function that calls it.
pub(crate) trait Kernel {
    type Out;
    fn run<S: Simd>(self, s: S) -> Self::Out;
    /// The path of a CPU without AVX2 (and of other architectures): `run` on `Scalar` unless the
    /// kernel has a compact version of its own (the same operations in the same order per value,
    /// so the same bits, checked against `run(Scalar)` by its tests). `run`'s 16-lane arrays
    /// unrolled as plain code are large: the Winograd transforms' scalar paths were 96 KB of the
    /// size-profile binary, their compact versions a few KB.
    fn scalar(self) -> Self::Out
    where
        Self: Sized,
    {
        self.run(Scalar)
    }
}

/// Runs `k` with the widest vectors the CPU has.
pub(crate) fn dispatch<K: Kernel>(k: K) -> K::Out {
    #[cfg(target_arch = "x86_64")]
    {
        if has_v4() {
            // SAFETY: the CPU has AVX-512F, AVX2 and FMA, the features on_v4 is compiled for.
            return unsafe { on_v4(k) };
        }
        if has_v3() {
            // SAFETY: the CPU has AVX2 and FMA, the features on_v3 is compiled for.
            return unsafe { on_v3(k) };
        }
    }
    k.scalar()
}

/// AVX2 and FMA: what on_v3 is compiled for.
#[cfg(target_arch = "x86_64")]
fn has_v3() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// AVX-512F with AVX2 and FMA: what on_v4 is compiled for.
#[cfg(target_arch = "x86_64")]
fn has_v4() -> bool {
    has_v3() && std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn on_v4<K: Kernel>(k: K) -> K::Out {
    k.run(V4(()))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn on_v3<K: Kernel>(k: K) -> K::Out {
    k.run(V3(()))
}

/// Plain code on `[f32; 16]` (any CPU).
#[derive(Clone, Copy)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    type V = [f32; 16];
    const SCALAR: bool = true;
    #[inline(always)]
    fn zero(self) -> Self::V {
        [0.0; 16]
    }
    #[inline(always)]
    fn splat(self, x: f32) -> Self::V {
        [x; 16]
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> Self::V {
        s[..16].try_into().expect("16 floats")
    }
    #[inline(always)]
    unsafe fn load_ptr(self, p: *const f32) -> Self::V {
        unsafe { std::ptr::read_unaligned(p as *const [f32; 16]) }
    }
    #[inline(always)]
    fn store(self, d: &mut [f32], v: Self::V) {
        d[..16].copy_from_slice(&v);
    }
    #[inline(always)]
    unsafe fn store_ptr(self, p: *mut f32, v: Self::V) {
        // SAFETY: the caller's contract.
        unsafe { (p as *mut [f32; 16]).write_unaligned(v) }
    }
    #[inline(always)]
    fn add(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    fn sub(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] - b[l])
    }
    #[inline(always)]
    fn mul(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] * b[l])
    }
    #[inline(always)]
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
    }
    #[inline(always)]
    fn load_first(self, s: &[f32], n: usize) -> Self::V {
        let mut v = [0.0; 16];
        v[..n].copy_from_slice(&s[..n]);
        v
    }
    #[inline(always)]
    unsafe fn store_first_ptr(self, p: *mut f32, v: Self::V, n: usize) {
        for (l, &x) in v.iter().enumerate().take(n) {
            // SAFETY: l < n, the caller's contract.
            unsafe { *p.add(l) = x };
        }
    }
    #[inline(always)]
    fn interleave(self, a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        let at = |i: usize| if i.is_multiple_of(2) { a[i / 2] } else { b[i / 2] };
        (std::array::from_fn(at), std::array::from_fn(|i| at(i + 16)))
    }
    #[inline(always)]
    fn deinterleave(self, p: Self::V, q: Self::V) -> (Self::V, Self::V) {
        let at = |i: usize| if i < 16 { p[i] } else { q[i - 16] };
        (std::array::from_fn(|i| at(2 * i)), std::array::from_fn(|i| at(2 * i + 1)))
    }
    #[inline(always)]
    fn any_nan(self, v: Self::V) -> bool {
        v.iter().any(|x| x.is_nan())
    }
    #[inline(always)]
    fn to_array(self, v: Self::V) -> [f32; 16] {
        v
    }
}

/// AVX-512F: one 512-bit register. Made only by `on_v4`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct V4(());

// SAFETY (every method): a V4 exists only inside on_v4, which runs only where dispatch found
// AVX-512F; pointer arguments are checked slices or the caller's contract.
#[cfg(target_arch = "x86_64")]
impl Simd for V4 {
    type V = __m512;
    #[inline(always)]
    fn zero(self) -> Self::V {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    fn splat(self, x: f32) -> Self::V {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> Self::V {
        unsafe { _mm512_loadu_ps(s[..16].as_ptr()) }
    }
    #[inline(always)]
    unsafe fn load_ptr(self, p: *const f32) -> Self::V {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    fn store(self, d: &mut [f32], v: Self::V) {
        unsafe { _mm512_storeu_ps(d[..16].as_mut_ptr(), v) }
    }
    #[inline(always)]
    unsafe fn store_ptr(self, p: *mut f32, v: Self::V) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    fn add(self, a: Self::V, b: Self::V) -> Self::V {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: Self::V, b: Self::V) -> Self::V {
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: Self::V, b: Self::V) -> Self::V {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn load_first(self, s: &[f32], n: usize) -> Self::V {
        let s = &s[..n.min(16)];
        unsafe { _mm512_maskz_loadu_ps(((1u32 << s.len()) - 1) as u16, s.as_ptr()) }
    }
    #[inline(always)]
    unsafe fn store_first_ptr(self, p: *mut f32, v: Self::V, n: usize) {
        unsafe { _mm512_mask_storeu_ps(p, ((1u32 << n.min(16)) - 1) as u16, v) }
    }
    #[inline(always)]
    fn interleave(self, a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        unsafe {
            let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            (_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b))
        }
    }
    #[inline(always)]
    fn deinterleave(self, p: Self::V, q: Self::V) -> (Self::V, Self::V) {
        unsafe {
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            (_mm512_permutex2var_ps(p, even, q), _mm512_permutex2var_ps(p, odd, q))
        }
    }
    #[inline(always)]
    fn any_nan(self, v: Self::V) -> bool {
        unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) != 0 }
    }
    #[inline(always)]
    fn to_array(self, v: Self::V) -> [f32; 16] {
        let mut a = [0.0; 16];
        self.store(&mut a, v);
        a
    }
}

/// AVX2 + FMA: two 256-bit registers. Made only by `on_v3`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct V3(());

// SAFETY (every method): a V3 exists only inside on_v3, which runs only where dispatch found
// AVX2 and FMA; pointer arguments are checked slices or the caller's contract.
#[cfg(target_arch = "x86_64")]
impl Simd for V3 {
    type V = [__m256; 2];
    #[inline(always)]
    fn zero(self) -> Self::V {
        unsafe { [_mm256_setzero_ps(); 2] }
    }
    #[inline(always)]
    fn splat(self, x: f32) -> Self::V {
        unsafe { [_mm256_set1_ps(x); 2] }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> Self::V {
        let s = &s[..16];
        unsafe { [_mm256_loadu_ps(s.as_ptr()), _mm256_loadu_ps(s[8..].as_ptr())] }
    }
    #[inline(always)]
    unsafe fn load_ptr(self, p: *const f32) -> Self::V {
        unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
    }
    #[inline(always)]
    fn store(self, d: &mut [f32], v: Self::V) {
        let d = &mut d[..16];
        unsafe {
            _mm256_storeu_ps(d.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(d[8..].as_mut_ptr(), v[1]);
        }
    }
    #[inline(always)]
    unsafe fn store_ptr(self, p: *mut f32, v: Self::V) {
        unsafe {
            _mm256_storeu_ps(p, v[0]);
            _mm256_storeu_ps(p.add(8), v[1]);
        }
    }
    #[inline(always)]
    fn add(self, a: Self::V, b: Self::V) -> Self::V {
        unsafe { [_mm256_add_ps(a[0], b[0]), _mm256_add_ps(a[1], b[1])] }
    }
    #[inline(always)]
    fn sub(self, a: Self::V, b: Self::V) -> Self::V {
        unsafe { [_mm256_sub_ps(a[0], b[0]), _mm256_sub_ps(a[1], b[1])] }
    }
    #[inline(always)]
    fn mul(self, a: Self::V, b: Self::V) -> Self::V {
        unsafe { [_mm256_mul_ps(a[0], b[0]), _mm256_mul_ps(a[1], b[1])] }
    }
    #[inline(always)]
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        unsafe { [_mm256_fmadd_ps(a[0], b[0], c[0]), _mm256_fmadd_ps(a[1], b[1], c[1])] }
    }
    #[inline(always)]
    fn load_first(self, s: &[f32], n: usize) -> Self::V {
        let s = &s[..n.min(16)];
        let (m0, m1) = v3_masks(self, s.len());
        unsafe { [_mm256_maskload_ps(s.as_ptr(), m0), _mm256_maskload_ps(s.as_ptr().wrapping_add(8), m1)] }
    }
    #[inline(always)]
    unsafe fn store_first_ptr(self, p: *mut f32, v: Self::V, n: usize) {
        let (m0, m1) = v3_masks(self, n.min(16));
        unsafe {
            _mm256_maskstore_ps(p, m0, v[0]);
            // masked-off lanes are not accessed, so p + 8 may lie past the end when n <= 8
            _mm256_maskstore_ps(p.wrapping_add(8), m1, v[1]);
        }
    }
    #[inline(always)]
    fn interleave(self, a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        unsafe {
            // per 128-bit lane, then the lanes put in order
            let half = |x: __m256, y: __m256| {
                let (lo, hi) = (_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
                [_mm256_permute2f128_ps::<0x20>(lo, hi), _mm256_permute2f128_ps::<0x31>(lo, hi)]
            };
            (half(a[0], b[0]), half(a[1], b[1]))
        }
    }
    #[inline(always)]
    fn deinterleave(self, p: Self::V, q: Self::V) -> (Self::V, Self::V) {
        unsafe {
            // 16 consecutive floats [x, y] to their evens and odds (each in lane order 0 2 1 3 of
            // 64-bit pairs after the shuffle, hence the permute)
            let split = |x: __m256, y: __m256| {
                let e = _mm256_shuffle_ps::<0b10_00_10_00>(x, y);
                let o = _mm256_shuffle_ps::<0b11_01_11_01>(x, y);
                let fix = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
                (fix(e), fix(o))
            };
            let (e0, o0) = split(p[0], p[1]);
            let (e1, o1) = split(q[0], q[1]);
            ([e0, e1], [o0, o1])
        }
    }
    #[inline(always)]
    fn any_nan(self, v: Self::V) -> bool {
        unsafe {
            let u = _mm256_or_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v[0], v[0]), _mm256_cmp_ps::<_CMP_UNORD_Q>(v[1], v[1]));
            _mm256_movemask_ps(u) != 0
        }
    }
    #[inline(always)]
    fn to_array(self, v: Self::V) -> [f32; 16] {
        let mut a = [0.0; 16];
        self.store(&mut a, v);
        a
    }
}

/// The lane masks of the first n (<= 16) floats, as AVX2's masked moves take them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn v3_masks(_: V3, n: usize) -> (__m256i, __m256i) {
    // SAFETY: a V3 exists only where the CPU has AVX2.
    unsafe {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let n0 = _mm256_set1_epi32(n as i32);
        let n1 = _mm256_set1_epi32(n as i32 - 8);
        (_mm256_cmpgt_epi32(n0, idx), _mm256_cmpgt_epi32(n1, idx))
    }
}

/// Every token this CPU can make, for tests that check each path against the scalar one.
#[cfg(test)]
pub(crate) fn each_path<K: Kernel + Clone>(k: K) -> Vec<(&'static str, K::Out)> {
    let mut out = vec![("scalar", k.clone().run(Scalar))];
    #[cfg(target_arch = "x86_64")]
    {
        if has_v3() {
            // SAFETY: checked just above.
            out.push(("avx2", unsafe { on_v3(k.clone()) }));
        }
        if has_v4() {
            // SAFETY: checked just above.
            out.push(("avx512", unsafe { on_v4(k) }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{each_path, Kernel, Simd};

    /// Every vector operation on every path against its plain definition.
    #[derive(Clone)]
    struct Ops;

    impl Kernel for Ops {
        type Out = Vec<f32>;
        #[inline(always)]
        fn run<S: Simd>(self, s: S) -> Vec<f32> {
            let a: Vec<f32> = (0..32).map(|i| i as f32 * 1.5 - 7.0).collect();
            let (p, q) = (s.load(&a), s.load(&a[16..]));
            let mut out = Vec::new();
            let (lo, hi) = s.interleave(p, q);
            out.extend(s.to_array(lo));
            out.extend(s.to_array(hi));
            let (e, o) = s.deinterleave(p, q);
            out.extend(s.to_array(e));
            out.extend(s.to_array(o));
            for n in [0, 1, 7, 8, 9, 15, 16] {
                out.extend(s.to_array(s.load_first(&a[..n], n)));
                let mut buf = [-1.0f32; 16];
                // SAFETY: n <= 16 floats of buf
                unsafe { s.store_first_ptr(buf.as_mut_ptr(), q, n) };
                out.extend(buf);
            }
            out.extend(s.to_array(s.add(s.mul(p, q), s.splat(0.5))));
            out.extend(s.to_array(s.sub(s.mul(p, q), s.add(p, s.zero()))));
            // (1 + 2⁻¹³)² - 1 = 2⁻¹² + 2⁻²⁶ fused; a rounded product would lose the 2⁻²⁶
            let e = s.splat(1.0 + f32::powi(2.0, -13));
            out.extend(s.to_array(s.mul_add(e, e, s.splat(-1.0))));
            out.extend(s.to_array(s.mul_add(p, q, s.splat(0.5))));
            // SAFETY: 16 floats of a from 3
            out.extend(s.to_array(unsafe { s.load_ptr(a[3..].as_ptr()) }));
            let mut st = [0.0f32; 16];
            // SAFETY: 16 floats of st
            unsafe { s.store_ptr(st.as_mut_ptr(), p) };
            out.extend(st);
            out
        }
    }

    #[test]
    fn every_path_computes_what_the_scalar_one_does() {
        let outs = each_path(Ops);
        let want = &outs[0].1;
        // spot checks of the scalar definitions themselves
        let a = |i: usize| i as f32 * 1.5 - 7.0;
        assert_eq!(&want[0..4], &[a(0), a(16), a(1), a(17)]);
        assert_eq!(&want[48..51], &[a(1), a(3), a(5)]);
        assert_eq!(&want[32..35], &[a(0), a(2), a(4)]);
        assert_eq!(want[320], f32::powi(2.0, -12) + f32::powi(2.0, -26), "mul_add is fused");
        assert_eq!(&want[352..354], &[a(3), a(4)]);
        for (name, got) in &outs {
            assert_eq!(got, want, "{name}");
        }
    }
}
