//! The pipelined attention kernels' tile shapes per element kind and head dim, mirroring
//! kernels/attention.cu (`attn_pipe_fwd_warps`, `attn_pipe_fwd_bc`, `attn_pipe_bwd_warps`,
//! `attn_pipe_bwd_bc`, `AttnTile::bytes`), and which problems they take.
//!
//! Every instance fits in 48 KiB of dynamic shared memory (the default a kernel may use without
//! opting in); f32 tiles (tf32) are twice bf16's bytes, so they take fewer rows per block at head
//! dims 64 and 128. The emulator traps a cp.async outside the launch's dynamic shared memory, so a
//! mirror that undercounts fails the tests.

use super::Launch;

/// The operand type of the pipelined kernels.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// bf16 q, k, v (bf16 autocast): `attention_pipe_*_bf16`.
    Bf16,
    /// f32 q, k, v on tf32 tensor cores (`--precision tf32`): `attention_pipe_*_f32`.
    Tf32,
}

/// The launches of the forward, the dQ and the dK/dV kernels for one problem.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Geometry {
    pub fwd: Launch,
    pub dq: Launch,
    pub dkdv: Launch,
}

/// Bytes of a tile of `rows` head rows: 16-byte chunks per row, tf32 rows of 4 chunks padded to 5
/// (AttnTile in kernels/attention.cu).
const fn tile_bytes(kind: Kind, dh: u32, rows: u32) -> u32 {
    let elem = match kind {
        Kind::Bf16 => 2,
        Kind::Tf32 => 4,
    };
    let chunks = dh * elem / 16;
    let stride = if matches!(kind, Kind::Tf32) && chunks == 4 { 5 } else { chunks };
    rows * stride * 16
}

/// The most warps per block at head dim `dh` (the forward's, the backward's): what fits in
/// 48 KiB (attn_pipe_fwd_warps, attn_pipe_bwd_warps).
const fn max_warps(kind: Kind, dh: u32) -> (u32, u32) {
    match kind {
        Kind::Bf16 => (4, 4),
        Kind::Tf32 => match dh {
            128 => (2, 1),
            64 => (4, 2),
            _ => (4, 4),
        },
    }
}

/// Rows of the streamed tiles (attn_pipe_fwd_bc, attn_pipe_bwd_bc).
const fn streamed_rows(kind: Kind, dh: u32) -> (u32, u32) {
    let fwd = if matches!(kind, Kind::Tf32) && dh == 128 { 16 } else { 32 };
    (fwd, if dh == 128 { 16 } else { 32 })
}

/// Warps for a block over `rows` rows: as few (1, 2 or 4) as cover them, at most `max` (a block's
/// padding rows cost the same tensor-core work as real ones: 18 text tokens take 2 warps, not 4).
const fn warps_for(rows: usize, max: u32) -> u32 {
    let want = if rows <= 16 {
        1
    } else if rows <= 32 {
        2
    } else {
        4
    };
    if want < max {
        want
    } else {
        max
    }
}

const fn fwd_launch(kind: Kind, dh: u32, warps: u32) -> Launch {
    let bc = streamed_rows(kind, dh).0;
    Launch {
        rows: 16 * warps,
        threads: 32 * warps,
        smem: tile_bytes(kind, dh, 16 * warps) + 4 * tile_bytes(kind, dh, bc),
    }
}

const fn bwd_launch(kind: Kind, dh: u32, warps: u32) -> Launch {
    let bc = streamed_rows(kind, dh).1;
    Launch {
        rows: 16 * warps,
        threads: 32 * warps,
        smem: 2 * tile_bytes(kind, dh, 16 * warps) + 4 * tile_bytes(kind, dh, bc),
    }
}

/// The launches for head dim `dh` (16, 32, 64 or 128), `tq` queries and `s` keys.
pub const fn geometry(kind: Kind, dh: u32, tq: usize, s: usize) -> Geometry {
    let (fwd_max, bwd_max) = max_warps(kind, dh);
    Geometry {
        fwd: fwd_launch(kind, dh, warps_for(tq, fwd_max)),
        dq: bwd_launch(kind, dh, warps_for(tq, bwd_max)),
        dkdv: bwd_launch(kind, dh, warps_for(s, bwd_max)),
    }
}

/// The launches at the most warps (long sequences): the kernels' largest shared memory.
pub const fn largest(kind: Kind, dh: u32) -> Geometry {
    geometry(kind, dh, usize::MAX, usize::MAX)
}

/// Whether the pipelined kernels take this problem by shape: a head dim of a tile width, no
/// probabilities asked for (the unpipelined kernels write them), and batch x heads within a grid's
/// y range. (The caller also needs 16-byte aligned q, k, v, o and d_out bases.)
pub fn pipelined(dh: usize, bh: usize, want_probs: bool) -> bool {
    matches!(dh, 16 | 32 | 64 | 128) && !want_probs && bh <= 65535
}

thread_local! {
    static UNPIPELINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the f32 attention at tf32 on the unpipelined kernels' tensor-core branch (the
/// bench's `_elem` cases: the pipeline's gain in the same run). This thread only.
pub fn with_unpipelined<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNPIPELINED.with(|u| u.set(self.0));
        }
    }
    let _restore = Restore(UNPIPELINED.with(|u| u.replace(true)));
    f()
}

/// Whether `with_unpipelined` is in force on this thread.
pub(crate) fn unpipelined() -> bool {
    UNPIPELINED.with(|u| u.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_instance_fits_in_48_kib() {
        for kind in [Kind::Bf16, Kind::Tf32] {
            for dh in [16, 32, 64, 128] {
                let g = largest(kind, dh);
                assert!(g.fwd.smem <= 48 * 1024 && g.dq.smem <= 48 * 1024, "{kind:?} {dh}: {g:?}");
            }
        }
        // the figures the kernel comments state
        let kib = |kind, f: fn(Geometry) -> u32| [16, 32, 64, 128].map(|dh| f(largest(kind, dh)) as f64 / 1024.0);
        assert_eq!(kib(Kind::Bf16, |g| g.fwd.smem), [6.0, 12.0, 24.0, 48.0]);
        assert_eq!(kib(Kind::Tf32, |g| g.fwd.smem), [15.0, 24.0, 48.0, 48.0]);
        assert_eq!(kib(Kind::Bf16, |g| g.dkdv.smem), [8.0, 16.0, 32.0, 48.0]);
        assert_eq!(kib(Kind::Tf32, |g| g.dkdv.smem), [20.0, 32.0, 48.0, 48.0]);
    }

    #[test]
    fn blocks_take_as_few_warps_as_cover_their_rows() {
        // the model's cross-attention: 18 text queries over 196 image keys, and the reverse
        let g = geometry(Kind::Bf16, 128, 18, 196);
        assert_eq!((g.fwd.rows, g.dq.rows, g.dkdv.rows), (32, 32, 64));
        let g = geometry(Kind::Bf16, 128, 196, 18);
        assert_eq!((g.fwd.rows, g.dq.rows, g.dkdv.rows), (64, 64, 32));
        // one query: one warp; tf32 at head dim 128 never more than its 48 KiB allow
        assert_eq!(geometry(Kind::Tf32, 64, 1, 1).fwd.threads, 32);
        let g = geometry(Kind::Tf32, 128, 196, 196);
        assert_eq!((g.fwd.rows, g.dq.rows, g.dkdv.rows), (32, 16, 16));
        // fewer warps, less shared memory: the Q tile shrinks, the streamed stages do not
        assert!(geometry(Kind::Bf16, 64, 16, 16).fwd.smem < largest(Kind::Bf16, 64).fwd.smem);
    }
}
