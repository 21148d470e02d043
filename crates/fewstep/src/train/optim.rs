//! AdamW with its moments in the open (candle_nn's keeps them private, and a checkpoint must save them),
//! with the same arithmetic as `candle_nn::AdamW` (and PyTorch's `AdamW`):
//!
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`,
//! `θ ← θ(1 − lr·λ) − lr·m̂/(√v̂ + ε)`;
//!
//! plus an optional linear warm-up of the learning rate and clipping of the global gradient norm.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::params::ParamStore;
use crate::{Error, Result};

/// AdamW's hyper-parameters. Defaults: diffusers' `train_text_to_image.py` (β 0.9/0.999, ε 1e-8, weight
/// decay 1e-2) with lr 1e-4, no warm-up, gradients clipped to norm 1.0 (its `max_grad_norm`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps over which the learning rate rises linearly from lr/warmup to lr (0: none).
    pub warmup_steps: usize,
    /// Clip the global L2 norm of the gradients to this (None: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            warmup_steps: 0,
            max_grad_norm: Some(1.0),
        }
    }
}

impl AdamWConfig {
    /// Checks every value is finite and in range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let finite_pos = |name: &str, v: f64| {
            if !v.is_finite() || v <= 0.0 {
                Err(Error::invalid(
                    name,
                    format!("must be a finite number > 0 (got {v})"),
                ))
            } else {
                Ok(())
            }
        };
        finite_pos("learning rate", self.lr)?;
        finite_pos("adam epsilon", self.eps)?;
        for (name, b) in [("adam beta1", self.beta1), ("adam beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(name, format!("must be in [0, 1) (got {b})")));
            }
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return Err(Error::invalid(
                "weight decay",
                format!("must be a finite number >= 0 (got {})", self.weight_decay),
            ));
        }
        if let Some(n) = self.max_grad_norm {
            finite_pos("max grad norm", n)?;
        }
        Ok(())
    }

    /// The learning rate of step `t` (1-based): `lr · min(1, t / warmup_steps)`.
    pub fn lr_at(&self, t: usize) -> f64 {
        if self.warmup_steps == 0 {
            self.lr
        } else {
            self.lr * (t as f64 / self.warmup_steps as f64).min(1.0)
        }
    }
}

/// AdamW state: step count and the two moments of every parameter (by name).
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken (`t` of the bias corrections).
    pub t: usize,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

impl AdamW {
    /// Zero moments for every parameter of `params`.
    pub fn new(config: AdamWConfig, params: &ParamStore) -> Result<Self> {
        config.validate()?;
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (k, var) in params.iter() {
            m.insert(k.clone(), var.zeros_like()?);
            v.insert(k.clone(), var.zeros_like()?);
        }
        Ok(Self { config, t: 0, m, v })
    }

    /// The global L2 norm of the gradients of `params`.
    pub fn grad_norm(params: &ParamStore, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for (_, var) in params.iter() {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt())
    }

    /// One update of every parameter that has a gradient; returns the gradient norm before clipping.
    pub fn step(&mut self, params: &ParamStore, grads: &GradStore) -> Result<f64> {
        let norm = Self::grad_norm(params, grads)?;
        if !norm.is_finite() {
            return Err(Error::invalid(
                "gradients",
                format!("their norm is {norm} (the loss diverged; lower the learning rate)"),
            ));
        }
        let clip = match self.config.max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.t += 1;
        let c = &self.config;
        let lr = c.lr_at(self.t);
        let (b1, b2) = (c.beta1, c.beta2);
        let scale_m = 1.0 / (1.0 - b1.powi(self.t as i32));
        let scale_v = 1.0 / (1.0 - b2.powi(self.t as i32));
        for (k, var) in params.iter() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = if clip != 1.0 { (g * clip)? } else { g.clone() };
            let m = &self.m[k];
            let next_m = ((m * b1)? + (&g * (1.0 - b1))?)?;
            let v = &self.v[k];
            let next_v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let theta = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let theta = (theta - (update * lr)?)?;
            var.set(&theta.detach())?;
            *self.m.get_mut(k).unwrap() = next_m.detach();
            *self.v.get_mut(k).unwrap() = next_v.detach();
        }
        Ok(norm)
    }
}
