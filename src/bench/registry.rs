//! Every op family's benchmark and self-check cases: one line per family. The order is the order
//! of `reclmis bench`'s output and of `reclmis selfcheck`.

use super::Group;
use crate::ops;

pub const GROUPS: &[Group] = &[
    ops::gemm::bench::GROUP,
    ops::softmax::bench::GROUP,
    ops::elementwise::bench::GROUP,
    ops::reduce::bench::GROUP,
    ops::transpose::bench::GROUP,
    ops::cast::bench::GROUP,
    #[cfg(feature = "train")]
    crate::optim::bench::GROUP,
    ops::ccl::bench::GROUP,
    ops::loss::bench::GROUP,
    ops::pool::bench::GROUP,
    ops::conv::bench::GROUP,
    ops::norm::bench::GROUP,
    ops::plam::bench::GROUP,
    ops::attention::bench::GROUP,
    ops::layer_norm::bench::GROUP,
    ops::embedding::bench::GROUP,
    crate::model::bench::GROUP,
];
