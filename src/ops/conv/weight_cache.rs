//! Winograd-transformed weights kept between calls, for weight tensors that are still alive.
//! Tensors are immutable once their op returns, and a live `Weak` pins its allocation (no other
//! tensor can get the same address), so "same live storage, same row stride" means "same
//! weights". Inference calls a layer with the same weights again and again: the transform (16
//! planes from every 3×3 filter, a quarter of a 14² × 512 convolution) is then paid once.
//! Training makes new weight tensors every step and misses, at the cost of the lookup.
//! Entries of dropped tensors are evicted on every insert; beyond `CAP_FLOATS` the oldest go.

use crate::tensor::Storage;
use std::sync::{Arc, Mutex, Weak};

/// At most 256 MB of transformed weights (the official U-Net's 3×3 layers need about 80 MB: 60 MB
/// at F(2×2, 3×3), plus about 19 MB for F(4×4, 3×3)'s 36 planes on the maps of 56² and more).
const CAP_FLOATS: usize = 64 << 20;

struct Entry {
    storage: Weak<Storage>,
    /// (row stride, Co, Ci) of the weights, which start at the storage's first element, and the
    /// transform's planes (16 for F(2×2, 3×3), 36 for F(4×4, 3×3))
    geom: (usize, usize, usize, usize),
    u: Arc<Vec<f32>>,
}

static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the cache on (the default) or off. A process that runs each layer once (one image
/// through `reclmis-infer`) gains nothing from it and pays its memory: about 80 MB of
/// transformed weights for the official U-Net, kept until the weights are dropped. Turning it off
/// also empties it.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
    if !on {
        CACHE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The cached transform of these weights, or `make()`'s, stored for next time.
pub(crate) fn get_or_make(
    storage: &Arc<Storage>,
    geom: (usize, usize, usize, usize),
    make: impl FnOnce() -> Vec<f32>,
) -> Arc<Vec<f32>> {
    if !ENABLED.load(std::sync::atomic::Ordering::Relaxed) {
        return Arc::new(make());
    }
    let weak = Arc::downgrade(storage);
    {
        // a poisoned lock only means another thread panicked mid-update: the list is still valid
        let cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = cache.iter().find(|e| e.storage.ptr_eq(&weak) && e.geom == geom) {
            return e.u.clone();
        }
    }
    let u = Arc::new(make());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache.retain(|e| e.storage.strong_count() > 0);
    cache.push(Entry { storage: weak, geom, u: u.clone() });
    let mut total: usize = cache.iter().map(|e| e.u.len()).sum();
    while total > CAP_FLOATS && cache.len() > 1 {
        total -= cache.remove(0).u.len();
    }
    u
}
