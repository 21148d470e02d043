//! ReLU, `y = max(x, 0)`, on all threads and on bf16's bits: TAESD takes it after nearly every
//! convolution, over 64 channels of up to 512×512 pixels, where candle's bf16 path widens each
//! value through a call of its own on one thread (a third of a TAESD decode).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::kernels::{contiguous_bf16, contiguous_f32, par_filled};

/// Values a task takes.
const BLOCK: usize = 1 << 16;

/// `max(x, 0)` elementwise (NaN gives 0, as candle's `relu`), on the CPU kernel for contiguous or
/// not bf16 and f32 tensors outside autograd, candle's `relu` otherwise.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    let kernel = x.device().is_cpu()
        && !x.track_op()
        && matches!(
            x.dtype(),
            candle_core::DType::BF16 | candle_core::DType::F32
        );
    match kernel {
        true => x.contiguous()?.apply_op1_no_bwd(&Relu),
        false => x.relu(),
    }
}

/// [`relu`] on the CPU.
struct Relu;

/// A bf16's bits if it is above zero (`0 < bits ≤ 0x7f80`: positive, up to +∞, not NaN), else 0.
fn relu_bits(bits: u16) -> u16 {
    match bits.wrapping_sub(1) < 0x7f80 {
        true => bits,
        false => 0,
    }
}

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = match s {
            CpuStorage::BF16(_) => {
                let x = contiguous_bf16(s, l, "relu: the input")?;
                CpuStorage::BF16(par_filled(x.len(), BLOCK, |i, y| {
                    for (y, x) in y.iter_mut().zip(&x[i * BLOCK..]) {
                        *y = half::bf16::from_bits(relu_bits(x.to_bits()));
                    }
                }))
            }
            _ => {
                let x = contiguous_f32(s, l, "relu: the input")?;
                CpuStorage::F32(par_filled(x.len(), BLOCK, |i, y| {
                    for (y, &x) in y.iter_mut().zip(&x[i * BLOCK..]) {
                        *y = if x > 0.0 { x } else { 0.0 };
                    }
                }))
            }
        };
        Ok((storage, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_input;
    use candle_core::{DType, Device};

    #[test]
    fn relu_matches_candles_on_every_kind_of_value() {
        // Random values across blocks, a transposed view, and the special values of bf16.
        for dtype in [DType::BF16, DType::F32] {
            let x = test_input(&[3, 70_001], 9).to_dtype(dtype).unwrap();
            for x in [x.clone(), x.t().unwrap()] {
                let (got, want) = (relu(&x).unwrap(), x.relu().unwrap());
                assert_eq!(got.dims(), want.dims());
                let values = |t: &Tensor| {
                    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                    t.to_vec1::<f32>().unwrap()
                };
                assert_eq!(values(&got), values(&want), "{dtype:?}");
            }
        }
        let special = [
            0.0,
            -0.0,
            1e-40,
            -1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            2.5,
            -2.5,
        ];
        let x = Tensor::new(&special[..], &Device::Cpu).unwrap();
        for dtype in [DType::BF16, DType::F32] {
            let x = x.to_dtype(dtype).unwrap();
            let got = relu(&x).unwrap().to_dtype(DType::F32).unwrap();
            let want = x.relu().unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(
                got.to_vec1::<f32>().unwrap(),
                want.to_vec1::<f32>().unwrap()
            );
        }
        let nan = half::bf16::from_bits(0x7fc1);
        let x = Tensor::new(&[nan, -nan][..], &Device::Cpu).unwrap();
        let got = relu(&x).unwrap().to_vec1::<half::bf16>().unwrap();
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), [0, 0]);
    }
}
