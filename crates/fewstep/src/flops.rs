//! A process-wide count of the floating-point operations of the layers that dominate diffusion models:
//! matrix products of linear layers, convolutions and attention. A multiply-add counts as two operations,
//! the convention of FLOP counters (PyTorch's `torch.utils.flop_counter`). Norms, activations and
//! element-wise sums are left out: they are a fraction of a percent of a UNet step.
//!
//! `fewstep bench` reads it to state achieved GFLOP/s beside each time.

use std::sync::atomic::{AtomicU64, Ordering};

static COUNT: AtomicU64 = AtomicU64::new(0);

/// Adds `n` operations to the count.
pub fn add(n: u64) {
    COUNT.fetch_add(n, Ordering::Relaxed);
}

/// Operations counted since the process started.
pub fn total() -> u64 {
    COUNT.load(Ordering::Relaxed)
}

/// Runs `f` and returns its result with the operations counted while it ran (work done by other
/// threads at the same time is counted too).
pub fn counted<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = total();
    let r = f();
    (r, total() - before)
}

/// `2·m·k·n`: a `[m, k]·[k, n]` matrix product.
pub fn matmul(m: usize, k: usize, n: usize) -> u64 {
    2 * m as u64 * k as u64 * n as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_runs_inside() {
        let ((), n) = counted(|| {
            add(matmul(2, 3, 4));
            add(5);
        });
        assert_eq!(n, 53);
    }
}
