//! Latent consistency distillation (LCD), the objective of the LCM paper (Luo et al. 2023, Algorithm 1)
//! as diffusers' `train_lcm_distill_sd_wds.py` / `train_lcm_distill_lora_sd_wds.py` compute it:
//!
//! - a DDIM solver over the skipped schedule of `n` of the 1000 training timesteps
//!   (`tᵢ = round((i+1)·T/n) − 1`, so k = T/n = 20 for n = 50);
//! - per sample an index `i`, the start `t = tᵢ` and the target timestep `s = max(t − k, 0)`;
//!   `x_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε`;
//! - the teacher's guided prediction with `w ~ U[w_min, w_max]`:
//!   `x̂₀ = x̂₀ᶜ + w(x̂₀ᶜ − x̂₀ᵘ)`, `ε̂ = ε̂ᶜ + w(ε̂ᶜ − ε̂ᵘ)`, one DDIM step
//!   `x_s = √ᾱ_prev,i x̂₀ + √(1−ᾱ_prev,i) ε̂` (`ᾱ_prev,i = ᾱ_{t_{i−1}}`, `ᾱ_0` for i = 0);
//! - the consistency function `f(x, t) = c_skip(t)·x + c_out(t)·x̂₀(x, t)` of the student at `(x_t, t)`
//!   and of the target network (the EMA copy, or the student itself for LCM-LoRA) at `(x_s, s)` without
//!   gradient; the loss `d(f_θ(x_t, t), f_θ⁻(x_s, s))`, L2 or pseudo-Huber.

use candle_core::{Device, Tensor};

pub use crate::schedulers::lcm::boundary_scalings;
use crate::Result;

/// The DDIM solver of LCD over `n` skipped timesteps.
#[derive(Debug, Clone)]
pub struct DdimSolver {
    /// `tᵢ = round((i+1)·T/n) − 1`, ascending (`T` the number of training timesteps).
    pub timesteps: Vec<usize>,
    /// `ᾱ_{tᵢ}`.
    pub alpha_cumprod: Vec<f32>,
    /// `ᾱ_{t_{i−1}}`, and `ᾱ_0` for `i = 0`.
    pub alpha_cumprod_prev: Vec<f32>,
}

impl DdimSolver {
    /// The solver for `alphas_cumprod` (length `T`) and `n` DDIM timesteps (`step_ratio = T / n`, integer
    /// division as the script's `timesteps // ddim_timesteps`).
    pub fn new(alphas_cumprod: &[f32], n: usize) -> Self {
        let ratio = alphas_cumprod.len() / n.max(1);
        let timesteps: Vec<usize> = (1..=n).map(|i| i * ratio - 1).collect();
        let alpha_cumprod: Vec<f32> = timesteps.iter().map(|&t| alphas_cumprod[t]).collect();
        let alpha_cumprod_prev = std::iter::once(alphas_cumprod[0])
            .chain(timesteps[..n - 1].iter().map(|&t| alphas_cumprod[t]))
            .collect();
        Self {
            timesteps,
            alpha_cumprod,
            alpha_cumprod_prev,
        }
    }

    /// The step between solver timesteps (`k`).
    pub fn skip(&self) -> usize {
        self.timesteps[0] + 1
    }

    /// The target timestep of index `i`: `max(tᵢ − k, 0)`.
    pub fn target_timestep(&self, i: usize) -> usize {
        self.timesteps[i].saturating_sub(self.skip())
    }

    /// One DDIM step from index `i` per sample: `x_prev = √ᾱ_prev,i · x̂₀ + √(1−ᾱ_prev,i) · ε̂`.
    pub fn step(&self, pred_x0: &Tensor, pred_eps: &Tensor, index: &[usize]) -> Result<Tensor> {
        let (a, b): (Vec<f32>, Vec<f32>) = index
            .iter()
            .map(|&i| {
                let ap = self.alpha_cumprod_prev[i];
                (ap.sqrt(), (1.0 - ap).sqrt())
            })
            .unzip();
        let dev = pred_x0.device();
        Ok((pred_x0.broadcast_mul(&per_sample(a, dev)?)?
            + pred_eps.broadcast_mul(&per_sample(b, dev)?)?)?)
    }
}

/// `[B, 1, 1, 1]` from per-sample scalars.
pub fn per_sample(v: Vec<f32>, device: &Device) -> Result<Tensor> {
    let n = v.len();
    Ok(Tensor::from_vec(v, (n, 1, 1, 1), device)?)
}

/// `x̂₀ = (x − √(1−ᾱ_t) ε̂)/√ᾱ_t` per sample (ε-prediction), with `alphas` the `ᾱ_t` of each sample.
pub fn predicted_x0(x: &Tensor, eps: &Tensor, alphas: &[f32]) -> Result<Tensor> {
    let dev = x.device();
    let sa = per_sample(alphas.iter().map(|a| 1.0 / a.sqrt()).collect(), dev)?;
    let sb = per_sample(alphas.iter().map(|a| (1.0 - a).sqrt()).collect(), dev)?;
    Ok((x - eps.broadcast_mul(&sb)?)?.broadcast_mul(&sa)?)
}

/// The consistency function `f(x, t) = c_skip(t)·x + c_out(t)·x̂₀` per sample.
pub fn consistency(
    x: &Tensor,
    pred_x0: &Tensor,
    timesteps: &[usize],
    timestep_scaling: f64,
) -> Result<Tensor> {
    let (cs, co): (Vec<f32>, Vec<f32>) = timesteps
        .iter()
        .map(|&t| boundary_scalings(t as f64, timestep_scaling))
        .unzip();
    let dev = x.device();
    Ok(
        (x.broadcast_mul(&per_sample(cs, dev)?)?
            + pred_x0.broadcast_mul(&per_sample(co, dev)?)?)?,
    )
}

/// The distance of LCD.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum LcdLoss {
    /// `mean((a − b)²)`.
    L2,
    /// Pseudo-Huber: `mean(√((a − b)² + c²) − c)`.
    Huber { c: f64 },
}

impl LcdLoss {
    pub fn compute(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let d2 = (a - b)?.sqr()?;
        Ok(match *self {
            LcdLoss::L2 => d2.mean_all()?,
            LcdLoss::Huber { c } => ((d2 + c * c)?.sqrt()? - c)?.mean_all()?,
        })
    }
}

/// Guided teacher predictions: `cond + w·(cond − uncond)` per sample (the script's `w` is the guidance
/// scale minus one).
pub fn guided(cond: &Tensor, uncond: &Tensor, w: &[f32]) -> Result<Tensor> {
    let wt = per_sample(w.to_vec(), cond.device())?;
    Ok((cond + (cond - uncond)?.broadcast_mul(&wt)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD's schedule at n = 50: k = 20, t₀ = 19, t₄₉ = 999, and the previous ᾱ of index 0 is ᾱ₀.
    #[test]
    fn solver_schedule_is_the_scripts() {
        let ac: Vec<f32> = (0..1000).map(|i| 1.0 - i as f32 / 1000.0).collect();
        let s = DdimSolver::new(&ac, 50);
        assert_eq!(s.timesteps.len(), 50);
        assert_eq!(
            (s.timesteps[0], s.timesteps[1], s.timesteps[49]),
            (19, 39, 999)
        );
        assert_eq!(s.skip(), 20);
        assert_eq!((s.target_timestep(0), s.target_timestep(3)), (0, 59));
        assert_eq!(s.alpha_cumprod_prev[0], ac[0]);
        assert_eq!(s.alpha_cumprod_prev[1], ac[19]);
        assert_eq!(s.alpha_cumprod[2], ac[59]);
    }

    /// The whole LCD target on one hand-made sample, every number worked out by hand:
    /// ᾱ_t = 0.64 (√ = 0.8, √(1−ᾱ) = 0.6), x = 1, ε̂ᶜ = 0.5, ε̂ᵘ = 0.25, w = 2.
    #[test]
    fn lcd_target_equals_a_hand_computation() {
        let dev = Device::Cpu;
        let one = |v: f32| Tensor::from_vec(vec![v], (1, 1, 1, 1), &dev).unwrap();
        let scalar = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        let x = one(1.0);
        // x̂₀ᶜ = (1 − 0.6·0.5)/0.8 = 0.875; x̂₀ᵘ = (1 − 0.6·0.25)/0.8 = 1.0625.
        let x0c = predicted_x0(&x, &one(0.5), &[0.64]).unwrap();
        let x0u = predicted_x0(&x, &one(0.25), &[0.64]).unwrap();
        assert!((scalar(x0c.clone()) - 0.875).abs() < 1e-6);
        assert!((scalar(x0u.clone()) - 1.0625).abs() < 1e-6);
        // Guided: x̂₀ = 0.875 + 2·(0.875 − 1.0625) = 0.5; ε̂ = 0.5 + 2·0.25 = 1.0.
        let x0 = guided(&x0c, &x0u, &[2.0]).unwrap();
        let eps = guided(&one(0.5), &one(0.25), &[2.0]).unwrap();
        assert!((scalar(x0.clone()) - 0.5).abs() < 1e-6);
        assert!((scalar(eps.clone()) - 1.0).abs() < 1e-6);
        // DDIM step with ᾱ_prev = 0.36: 0.6·0.5 + 0.8·1.0 = 1.1.
        let solver = DdimSolver {
            timesteps: vec![19, 39],
            alpha_cumprod: vec![0.9, 0.64],
            alpha_cumprod_prev: vec![1.0, 0.36],
        };
        let x_prev = solver.step(&x0, &eps, &[1]).unwrap();
        assert!((scalar(x_prev.clone()) - 1.1).abs() < 1e-6);
        // Boundary scalings at t = 19 (s = 190): c_skip = 0.25/36100.25, c_out = 190/√36100.25.
        let (cs, co) = boundary_scalings(19.0, 10.0);
        assert!((cs - 0.25 / 36100.25).abs() < 1e-9);
        assert!((co - 190.0 / 36100.25f32.sqrt()).abs() < 1e-6);
        // f(x_prev, 19) with x̂₀ = 0.7: c_skip·1.1 + c_out·0.7.
        let f = consistency(&x_prev, &one(0.7), &[19], 10.0).unwrap();
        assert!((scalar(f) - (cs * 1.1 + co * 0.7)).abs() < 1e-6);
        // At t = 0 the consistency function is the identity.
        let f0 = consistency(&x_prev, &one(0.7), &[0], 10.0).unwrap();
        assert!((scalar(f0) - 1.1).abs() < 1e-6);
        // Pseudo-Huber of a − b = 0.3 with c = 0.4: √(0.09 + 0.16) − 0.4 = 0.1; L2: 0.09.
        let h = LcdLoss::Huber { c: 0.4 }
            .compute(&one(0.5), &one(0.2))
            .unwrap();
        let l2 = LcdLoss::L2.compute(&one(0.5), &one(0.2)).unwrap();
        assert!((h.to_scalar::<f32>().unwrap() - 0.1).abs() < 1e-6);
        assert!((l2.to_scalar::<f32>().unwrap() - 0.09).abs() < 1e-6);
    }
}
