//! Multiply-add counting for `reclmis model --flops`: while `measure` runs, every matrix-product
//! op of the graph (Linear, the convolutions, attention, the CCL similarity) adds its
//! multiply-adds to the module the model last named with `at`, the forward's when it runs and
//! the backward's when its closure does (under the module that recorded it). Elementwise ops,
//! norms, softmax, pooling and the PLAM gate's channel MLPs are not counted (under 1% of the
//! convolutions' at every preset; see README). Outside `measure`, `at` and the counts cost one
//! thread-local read. Without the `train` feature they compile to nothing.

/// Multiply-adds of one module.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Macs {
    pub forward: u64,
    pub backward: u64,
}

#[cfg(feature = "train")]
mod state {
    use super::Macs;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    pub struct State {
        pub label: &'static str,
        pub counts: BTreeMap<&'static str, Macs>,
    }

    thread_local! {
        pub static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
    }
}

/// Runs `f` counting multiply-adds; returns its result and the counts per module (in the order
/// of their names). Ops before the first `at` count under "other".
#[cfg(feature = "train")]
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, std::collections::BTreeMap<&'static str, Macs>) {
    use state::{State, STATE};
    let saved = STATE.with(|s| s.borrow_mut().replace(State { label: "other", counts: Default::default() }));
    let out = f();
    let counts = STATE.with(|s| std::mem::replace(&mut *s.borrow_mut(), saved)).map(|s| s.counts).unwrap_or_default();
    (out, counts)
}

/// The module the following ops belong to (a name of the official key list: "down1", "interact").
#[inline]
pub fn at(_label: &'static str) {
    #[cfg(feature = "train")]
    {
        state::STATE.with(|s| {
            if let Some(s) = s.borrow_mut().as_mut() {
                s.label = _label;
            }
        });
        timer::at(_label);
    }
}

/// Wall time per module for `reclmis bench-model --profile`: while `timed` runs, each `at`
/// waits for the device (so a GPU's queued kernels count where they were launched) and adds the
/// time since the previous `at` to the previous module. Ops before the first `at` count under
/// "other"; what follows the last one (a loss, a backward) under the last module unless the
/// caller names it with `at`.
#[cfg(feature = "train")]
pub mod timer {
    use crate::device::Device;
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::time::Instant;

    struct Timer {
        dev: Device,
        label: &'static str,
        since: Instant,
        seconds: BTreeMap<&'static str, f64>,
    }

    thread_local! {
        static TIMER: RefCell<Option<Timer>> = const { RefCell::new(None) };
    }

    pub(super) fn at(label: &'static str) {
        TIMER.with(|t| {
            if let Some(t) = t.borrow_mut().as_mut() {
                // a failed synchronise shows again at the caller's own; the time is then moot
                let _ = t.dev.synchronize();
                let now = Instant::now();
                *t.seconds.entry(t.label).or_default() += (now - t.since).as_secs_f64();
                t.label = label;
                t.since = now;
            }
        });
    }

    /// Runs `f` timing its modules on `dev`; returns its result and the seconds per module.
    pub fn timed<T>(dev: &Device, f: impl FnOnce() -> T) -> (T, BTreeMap<&'static str, f64>) {
        let fresh = Timer { dev: dev.clone(), label: "other", since: Instant::now(), seconds: BTreeMap::new() };
        let saved = TIMER.with(|t| t.borrow_mut().replace(fresh));
        let out = f();
        at("other");
        let seconds =
            TIMER.with(|t| std::mem::replace(&mut *t.borrow_mut(), saved)).map(|t| t.seconds).unwrap_or_default();
        (out, seconds)
    }
}

/// The current module while counting (what a backward closure records under), else None.
#[inline]
pub fn label() -> Option<&'static str> {
    #[cfg(feature = "train")]
    return state::STATE.with(|s| s.borrow().as_ref().map(|s| s.label));
    #[cfg(not(feature = "train"))]
    None
}

/// A forward op's multiply-adds, under the current module.
#[inline]
pub fn forward(_macs: u64) {
    #[cfg(feature = "train")]
    state::STATE.with(|s| {
        if let Some(s) = s.borrow_mut().as_mut() {
            s.counts.entry(s.label).or_default().forward += _macs;
        }
    });
}

/// A backward closure's multiply-adds, under the module that recorded it (`label()` then).
#[inline]
pub fn backward(_label: Option<&'static str>, _macs: u64) {
    #[cfg(feature = "train")]
    if let Some(l) = _label {
        state::STATE.with(|s| {
            if let Some(s) = s.borrow_mut().as_mut() {
                s.counts.entry(l).or_default().backward += _macs;
            }
        });
    }
}
