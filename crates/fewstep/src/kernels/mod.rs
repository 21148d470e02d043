//! CPU kernels as candle custom ops, for the paths where candle's own CPU implementation is the
//! bottleneck. Other devices keep candle's ops; each kernel is tested against the plain candle op.

pub mod attention;
pub mod group_norm;
pub mod softmax;
pub mod unfold;
pub mod winograd;

/// Uniform values in [-2, 2) from a linear congruential generator, reproducible per seed: the random
/// inputs of the kernels' tests.
#[cfg(test)]
pub(crate) fn test_input(shape: &[usize], seed: u64) -> candle_core::Tensor {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// The largest absolute difference between two tensors of one shape: the error measure of the kernels'
/// tests.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// The largest absolute value of a tensor.
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}
