//! The Fréchet distance between two Gaussians fitted to feature sets (FID when the features are an
//! image classifier's): `d² = |μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2})` (Heusel et al. 2017), with the
//! trace of the matrix square root computed exactly as `Tr((Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})` from symmetric
//! eigendecompositions (the product `Σ₁Σ₂` has the same eigenvalues as that symmetric matrix).

use crate::{Error, Result};

/// Mean and (unbiased, `n − 1`) covariance of `n` feature rows of width `d`, in f64.
pub fn moments(rows: &[Vec<f32>]) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = rows.len();
    if n < 2 {
        return Err(Error::invalid(
            "features",
            format!("need at least 2 rows (got {n})"),
        ));
    }
    let d = rows[0].len();
    if let Some(r) = rows.iter().find(|r| r.len() != d) {
        return Err(Error::invalid(
            "features",
            format!("rows of width {d} and {}", r.len()),
        ));
    }
    let mut mean = vec![0f64; d];
    for r in rows {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut cov = vec![0f64; d * d];
    for r in rows {
        let c: Vec<f64> = r.iter().zip(&mean).map(|(&v, m)| v as f64 - m).collect();
        for i in 0..d {
            for j in i..d {
                cov[i * d + j] += c[i] * c[j];
            }
        }
    }
    for i in 0..d {
        for j in i..d {
            let v = cov[i * d + j] / (n - 1) as f64;
            cov[i * d + j] = v;
            cov[j * d + i] = v;
        }
    }
    Ok((mean, cov))
}

/// Eigenvalues and eigenvectors (columns of `v`, row-major `d×d`) of the symmetric matrix `a`, by cyclic
/// Jacobi rotations until the off-diagonal mass is below 1e-22 of the total.
pub fn symmetric_eigen(a: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0f64; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] * a[i * d + j])
            .sum();
        if off <= 1e-22 * total {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

/// `A^{1/2}` of a symmetric positive semi-definite matrix (negative rounding-error eigenvalues → 0).
fn sqrt_psd(a: &[f64], d: usize) -> Vec<f64> {
    let (w, v) = symmetric_eigen(a, d);
    let mut out = vec![0f64; d * d];
    for k in 0..d {
        let s = w[k].max(0.0).sqrt();
        for i in 0..d {
            for j in 0..d {
                out[i * d + j] += v[i * d + k] * s * v[j * d + k];
            }
        }
    }
    out
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    for i in 0..d {
        for k in 0..d {
            let x = a[i * d + k];
            for j in 0..d {
                out[i * d + j] += x * b[k * d + j];
            }
        }
    }
    out
}

/// The Fréchet distance `d²` between `N(μ₁, Σ₁)` and `N(μ₂, Σ₂)` (see the module doc).
pub fn frechet_distance(mu1: &[f64], cov1: &[f64], mu2: &[f64], cov2: &[f64]) -> f64 {
    let d = mu1.len();
    let mean_term: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b) * (a - b)).sum();
    let s1 = sqrt_psd(cov1, d);
    let inner = matmul(&matmul(&s1, cov2, d), &s1, d);
    // Symmetrise against rounding before the eigendecomposition.
    let sym: Vec<f64> = (0..d * d)
        .map(|k| 0.5 * (inner[k] + inner[(k % d) * d + k / d]))
        .collect();
    let (w, _) = symmetric_eigen(&sym, d);
    let tr_sqrt: f64 = w.iter().map(|x| x.max(0.0).sqrt()).sum();
    let tr1: f64 = (0..d).map(|i| cov1[i * d + i]).sum();
    let tr2: f64 = (0..d).map(|i| cov2[i * d + i]).sum();
    mean_term + tr1 + tr2 - 2.0 * tr_sqrt
}

/// FID-style score of two feature sets: the Fréchet distance of their fitted Gaussians.
pub fn feature_frechet_distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<f64> {
    let (m1, c1) = moments(a)?;
    let (m2, c2) = moments(b)?;
    if m1.len() != m2.len() {
        return Err(Error::invalid(
            "features",
            format!("widths {} and {} differ", m1.len(), m2.len()),
        ));
    }
    Ok(frechet_distance(&m1, &c1, &m2, &c2))
}
