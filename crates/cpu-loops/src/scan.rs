//! Checks over whole buffers (a loaded checkpoint's 80M values must not cost a visible pause).

use crate::simd::{dispatch, Kernel, Simd};

/// The index of the first NaN or infinity in x. v − v is NaN exactly where v is not finite, so
/// 64 values at a time are summed that way and tested once; only a block that holds one is
/// searched.
pub fn first_non_finite(x: &[f32]) -> Option<usize> {
    dispatch(FirstNonFinite(x))
}

#[derive(Clone)]
struct FirstNonFinite<'a>(&'a [f32]);

impl Kernel for FirstNonFinite<'_> {
    type Out = Option<usize>;
    #[inline(always)]
    fn run<S: Simd>(self, s: S) -> Option<usize> {
        const BLOCK: usize = 64;
        let x = self.0;
        let full = x.len() / BLOCK * BLOCK;
        let mut b = 0;
        while b < full {
            let mut acc = s.zero();
            for i in 0..BLOCK / 16 {
                let v = s.load(&x[b + 16 * i..]);
                acc = s.add(acc, s.sub(v, v));
            }
            if s.any_nan(acc) {
                break;
            }
            b += BLOCK;
        }
        x[b..].iter().position(|v| !v.is_finite()).map(|i| b + i)
    }
}

#[cfg(test)]
mod tests {
    use super::FirstNonFinite;

    #[test]
    fn finds_the_first_nan_or_infinity_on_every_path() {
        for n in [0usize, 1, 15, 16, 63, 64, 65, 200, 1000] {
            let mut x: Vec<f32> = (0..n).map(|i| (i as f32 - 7.5) * 1e30).collect();
            for (name, got) in crate::simd::each_path(FirstNonFinite(&x)) {
                assert_eq!(got, None, "{name}, n = {n}");
            }
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0, n / 3, n.saturating_sub(1)] {
                    if n == 0 {
                        continue;
                    }
                    x[at] = bad;
                    // a second one later must not be reported instead
                    if at + 5 < n {
                        x[at + 5] = f32::NAN;
                    }
                    for (name, got) in crate::simd::each_path(FirstNonFinite(&x)) {
                        assert_eq!(got, Some(at), "{name}, n = {n}, {bad} at {at}");
                    }
                    x[at] = 1.0;
                    if at + 5 < n {
                        x[at + 5] = 1.0;
                    }
                }
            }
        }
    }
}
