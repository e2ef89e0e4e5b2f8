//! The batched-GEMM cases the f32 and bf16 GEMM tests share.

use super::dim;
use proptest::prelude::*;
use reclmis::ops::gemm::{GemmAlgo, GemmOpts};

#[derive(Clone, Debug)]
pub struct Case {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// 0: both batched, 1: A shared (2-D), 2: B shared
    pub shared: u8,
    pub alpha: f32,
}

impl Case {
    pub fn shapes(&self) -> (Vec<usize>, Vec<usize>) {
        let a2 = if self.trans_a { vec![self.k, self.m] } else { vec![self.m, self.k] };
        let b2 = if self.trans_b { vec![self.n, self.k] } else { vec![self.k, self.n] };
        let with_batch = |s: Vec<usize>, shared: bool| {
            if shared {
                s
            } else {
                [vec![self.batch], s].concat()
            }
        };
        (with_batch(a2, self.shared == 1), with_batch(b2, self.shared == 2))
    }
    pub fn opts(&self, algo: GemmAlgo) -> GemmOpts {
        GemmOpts { trans_a: self.trans_a, trans_b: self.trans_b, alpha: self.alpha, algo }
    }
}

pub fn case() -> impl Strategy<Value = Case> {
    (1usize..4, dim(), dim(), dim(), any::<bool>(), any::<bool>(), 0u8..3, prop_oneof![Just(1.0f32), -2.0f32..2.0])
        .prop_map(|(batch, m, n, k, trans_a, trans_b, shared, alpha)| Case {
            batch,
            m,
            n,
            k,
            trans_a,
            trans_b,
            shared,
            alpha,
        })
}
