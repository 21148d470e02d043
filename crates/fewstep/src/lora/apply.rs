//! Applying LoRAs to a model's parts: [`fuse`] writes `W' = W + Σᵢ wᵢ · scaleᵢ · upᵢ · downᵢ` into new
//! weight views (computed in f32 — on the CPU accumulated into the weight's own copy by one GEMM —, stored in
//! the view's dtype), [`runtime`] attaches the same updates as
//! branches that the layers compute beside their weight. Either way the original [`ModelParts`] are left
//! untouched: they are the un-fused model, bit for bit.
//!
//! Every module of every LoRA must land on a layer of the model whose weight has the update's shape;
//! anything else is an error naming the key.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Tensor};

use super::{first_ten, kohya, LoraBranch, LoraFile, LoraModule, ModuleRef, Target};
use crate::config::UNet2DConditionConfig;
use crate::weights::parts::ModelParts;
use crate::weights::Weights;
use crate::{Error, Result};

/// What one LoRA touched.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraReport {
    pub path: PathBuf,
    /// The file name without `.safetensors`.
    pub name: String,
    pub weight: f64,
    /// Modules adapted per model.
    pub unet: usize,
    pub text_encoder: usize,
    pub text_encoder_2: usize,
}

/// What [`fuse`] or [`runtime`] did, one entry per LoRA in the order given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FuseReport {
    pub loras: Vec<LoraReport>,
    /// Distinct weights changed (several LoRAs on one layer count once).
    pub layers: usize,
}

/// The modules of one model, by the names LoRAs use for them.
struct ModuleIndex {
    target: Target,
    /// Canonical module path (text encoders without `text_model.`) → full weight key, weight shape.
    by_path: HashMap<String, (String, Vec<usize>)>,
    /// kohya-flattened path → canonical path; `None` where two paths flatten alike.
    by_flat: HashMap<String, Option<String>>,
    /// kohya-flattened LDM name → canonical path (UNet only).
    by_ldm: HashMap<String, String>,
}

impl ModuleIndex {
    fn new(
        target: Target,
        w: &Weights,
        unet_config: Option<&UNet2DConditionConfig>,
    ) -> Result<Self> {
        let mut by_path = HashMap::new();
        for key in w.keys() {
            let Some(module) = key.strip_suffix(".weight") else {
                continue;
            };
            let Some(shape) = w.shape_of(key) else {
                continue;
            };
            if !matches!(shape.len(), 2 | 4) {
                continue;
            }
            let canonical = match target {
                Target::Unet => module,
                _ => module.strip_prefix("text_model.").unwrap_or(module),
            };
            by_path.insert(canonical.to_string(), (key.clone(), shape));
        }
        let mut by_flat: HashMap<String, Option<String>> = HashMap::new();
        for p in by_path.keys() {
            by_flat
                .entry(kohya::flatten(p))
                .and_modify(|e| *e = None)
                .or_insert_with(|| Some(p.clone()));
        }
        let mut by_ldm = HashMap::new();
        if let Some(cfg) = unet_config {
            for (diffusers, ldm) in kohya::ldm_module_map(cfg)? {
                if by_path.contains_key(&diffusers) {
                    by_ldm.insert(kohya::flatten(&ldm), diffusers);
                }
            }
        }
        Ok(Self {
            target,
            by_path,
            by_flat,
            by_ldm,
        })
    }

    /// The weight key and shape a LoRA module adapts, if the model has it.
    fn find(&self, m: &ModuleRef) -> Option<&(String, Vec<usize>)> {
        let path = match m {
            ModuleRef::Path(p) => p,
            ModuleRef::Flat(f) => match self.by_flat.get(f) {
                Some(Some(p)) => p,
                _ if self.target == Target::Unet && kohya::is_ldm_name(f) => self.by_ldm.get(f)?,
                _ => return None,
            },
        };
        self.by_path.get(path)
    }
}

/// A LoRA module placed on a model weight.
struct Placed<'a> {
    lora: usize,
    module: &'a LoraModule,
    key: String,
    shape: Vec<usize>,
}

/// Whether an update of shape `delta` fits a weight of shape `weight` (a 1×1 convolution and a Linear
/// of the same sizes take each other's updates).
fn fits(delta: &[usize], weight: &[usize]) -> bool {
    delta == weight
        || (delta.len() == 4 && delta[2..] == [1, 1] && weight == &delta[..2])
        || (weight.len() == 4 && weight[2..] == [1, 1] && delta == &weight[..2])
}

fn views(parts: &ModelParts, target: Target) -> Option<&Weights> {
    match target {
        Target::Unet => Some(&parts.unet),
        Target::TextEncoder => Some(&parts.text_encoder),
        Target::TextEncoder2 => parts.text_encoder_2.as_ref().map(|t| &t.weights),
    }
}

/// Places every module of every LoRA, or fails naming the first module whose shape does not fit, then the
/// first ten that match nothing.
fn place<'a>(
    parts: &ModelParts,
    loras: &'a [(LoraFile, f64)],
) -> Result<(Vec<Placed<'a>>, FuseReport)> {
    let mut indexes: HashMap<Target, Option<ModuleIndex>> = HashMap::new();
    let mut placed = Vec::new();
    let mut report = FuseReport::default();
    for (i, (lora, weight)) in loras.iter().enumerate() {
        let err = |reason: String| Error::Lora {
            path: lora.path.clone(),
            reason,
        };
        if !weight.is_finite() {
            return Err(err(format!("weight {weight} is not a finite number")));
        }
        let mut unmatched: Vec<String> = Vec::new();
        let mut counts: BTreeMap<Target, usize> = BTreeMap::new();
        for m in &lora.modules {
            if let std::collections::hash_map::Entry::Vacant(slot) = indexes.entry(m.target) {
                let index = match views(parts, m.target) {
                    Some(w) => {
                        let need_ldm = loras.iter().flat_map(|(l, _)| &l.modules).any(|m| {
                            matches!(&m.module, ModuleRef::Flat(f) if m.target == Target::Unet && kohya::is_ldm_name(f))
                        });
                        Some(ModuleIndex::new(
                            m.target,
                            w,
                            (m.target == Target::Unet && need_ldm).then_some(&parts.unet_config),
                        )?)
                    }
                    None => None,
                };
                slot.insert(index);
            }
            let found = indexes[&m.target]
                .as_ref()
                .and_then(|ix| ix.find(&m.module));
            let Some((key, shape)) = found else {
                unmatched.push(match indexes[&m.target] {
                    Some(_) => m.down_key.clone(),
                    None => format!("{} (the model has no {})", m.down_key, m.target.name()),
                });
                continue;
            };
            let delta = m.delta_shape();
            if !fits(&delta, shape) {
                return Err(err(format!(
                    "`{}` updates `{key}` with shape {delta:?} (down {:?}, up {:?}) but the model's weight \
                     is {shape:?}: a LoRA for another model (e.g. SDXL on SD 1.5)?",
                    m.down_key,
                    m.down.dims(),
                    m.up.dims()
                )));
            }
            *counts.entry(m.target).or_default() += 1;
            placed.push(Placed {
                lora: i,
                module: m,
                key: key.clone(),
                shape: shape.clone(),
            });
        }
        if !unmatched.is_empty() {
            return Err(err(format!(
                "{} of its {} modules match no layer of the model: {}",
                unmatched.len(),
                lora.modules.len(),
                first_ten(unmatched.iter().map(String::as_str))
            )));
        }
        let r = LoraReport {
            path: lora.path.clone(),
            name: lora.name(),
            weight: *weight,
            unet: counts.get(&Target::Unet).copied().unwrap_or(0),
            text_encoder: counts.get(&Target::TextEncoder).copied().unwrap_or(0),
            text_encoder_2: counts.get(&Target::TextEncoder2).copied().unwrap_or(0),
        };
        tracing::info!(
            lora = %r.name,
            weight = r.weight,
            unet_modules = r.unet,
            text_encoder_modules = r.text_encoder,
            text_encoder_2_modules = r.text_encoder_2,
            "LoRA matched"
        );
        report.loras.push(r);
    }
    let mut keys: Vec<(Target, &str)> = placed
        .iter()
        .map(|p| (p.module.target, p.key.as_str()))
        .collect();
    keys.sort();
    keys.dedup();
    report.layers = keys.len();
    Ok((placed, report))
}

/// The modules on one weight as two factors of ONE matrix product: the ups (each scaled by its effective
/// scale) side by side and the downs stacked, `U = [s₁up₁ … sₖupₖ]: [out, Σr]`,
/// `D = [down₁; …; downₖ]: [Σr, in·kh·kw]`, so that `Σᵢ sᵢ·upᵢ·downᵢ = U·D`.
fn factors(mods: &[(&LoraModule, f64)], out: usize) -> Result<(Tensor, Tensor)> {
    let mut ups = Vec::with_capacity(mods.len());
    let mut downs = Vec::with_capacity(mods.len());
    for (m, s) in mods {
        let r = m.rank();
        ups.push((m.up.reshape((out, r))? * *s)?);
        downs.push(m.down.reshape((r, ()))?);
    }
    Ok((
        Tensor::cat(&ups, 1)?.contiguous()?,
        Tensor::cat(&downs, 0)?.contiguous()?,
    ))
}

/// `W ← W + U·D` in place on f32 CPU storage: one GEMM that accumulates into the weight (β = 1) on the
/// calling thread ([`fuse`] runs layers in parallel), so the update is never held as a separate tensor.
struct AddProduct;

impl candle_core::InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "lora-add-product"
    }

    fn cpu_fwd(
        &self,
        w: &mut candle_core::CpuStorage,
        lw: &candle_core::Layout,
        u: &candle_core::CpuStorage,
        lu: &candle_core::Layout,
        d: &candle_core::CpuStorage,
        ld: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage::F32;
        let (F32(w), F32(u), F32(d)) = (w, u, d) else {
            candle_core::bail!("lora-add-product: f32 tensors expected")
        };
        let (Some((w0, w1)), Some((u0, u1)), Some((d0, d1))) = (
            lw.contiguous_offsets(),
            lu.contiguous_offsets(),
            ld.contiguous_offsets(),
        ) else {
            candle_core::bail!("lora-add-product: contiguous tensors expected")
        };
        let (out, r) = lu.shape().dims2()?;
        let (r2, k) = ld.shape().dims2()?;
        if r != r2 || w1 - w0 != out * k {
            candle_core::bail!(
                "lora-add-product: [{out}, {r}]·[{r2}, {k}] does not fit a weight of {} values",
                w1 - w0
            )
        }
        let (w, u, d) = (&mut w[w0..w1], &u[u0..u1], &d[d0..d1]);
        // SAFETY: w holds out·k, u out·r and d r·k elements, row-major with the strides given.
        unsafe {
            gemm::gemm(
                out,
                k,
                r,
                w.as_mut_ptr(),
                1,
                k as isize,
                true,
                u.as_ptr(),
                1,
                r as isize,
                d.as_ptr(),
                1,
                k as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
        Ok(())
    }
}

/// `W + Σᵢ sᵢ·upᵢ·downᵢ` for `base: W` (f32, a tensor of its own unless `shared`), reshaped to `shape`:
/// accumulated into `W`'s own memory on the CPU ([`AddProduct`]), as `W + U·D` elsewhere.
fn add_update(
    base: Tensor,
    shared: bool,
    mods: &[(&LoraModule, f64)],
    shape: &[usize],
) -> Result<Tensor> {
    let (up, down) = factors(mods, shape[0])?;
    if !base.device().is_cpu() {
        return Ok((base + up.matmul(&down)?.reshape(shape)?)?);
    }
    let w = if shared || !base.is_contiguous() {
        base.copy()?.contiguous()?
    } else {
        base
    };
    w.inplace_op3(&up, &down, &AddProduct)?;
    Ok(w.reshape(shape)?)
}

/// Per (target, weight key): the weight's shape and the modules on it with their effective scales.
type Layers<'a> = BTreeMap<(Target, String), (Vec<usize>, Vec<(&'a LoraModule, f64)>)>;

/// Groups the placed modules by (target, weight key), with their effective scales (`weight · alpha/r`).
fn by_layer<'a>(placed: &[Placed<'a>], loras: &[(LoraFile, f64)]) -> Layers<'a> {
    let mut layers: Layers<'a> = BTreeMap::new();
    for p in placed {
        layers
            .entry((p.module.target, p.key.clone()))
            .or_insert_with(|| (p.shape.clone(), Vec::new()))
            .1
            .push((p.module, loras[p.lora].1 * p.module.scale));
    }
    layers
}

fn with_views(
    parts: &ModelParts,
    mut f: impl FnMut(Target, &Weights) -> Result<Weights>,
) -> Result<ModelParts> {
    let mut out = parts.clone();
    out.unet = f(Target::Unet, &parts.unet)?;
    out.text_encoder = f(Target::TextEncoder, &parts.text_encoder)?;
    if let (Some(dst), Some(src)) = (&mut out.text_encoder_2, &parts.text_encoder_2) {
        dst.weights = f(Target::TextEncoder2, &src.weights)?;
    }
    Ok(out)
}

/// Fuses `loras` (each with its weight) into new views of the model's weights:
/// `W' = W + Σᵢ weightᵢ · scaleᵢ · upᵢ · downᵢ`, computed in f32 from the stored weight and cast once to
/// the view's dtype. `parts` itself is unchanged (it is the un-fused model).
pub fn fuse(parts: &ModelParts, loras: &[(LoraFile, f64)]) -> Result<(ModelParts, FuseReport)> {
    let start = std::time::Instant::now();
    let (placed, report) = place(parts, loras)?;
    let layers = by_layer(&placed, loras);
    let fused = with_views(parts, |target, w| {
        use rayon::prelude::*;
        let f32_view = w.with_dtype(DType::F32);
        // Layers in parallel, each read, updated and cast on one thread: the file reads and page
        // faults of one layer overlap another's product.
        let overrides = layers
            .par_iter()
            .filter(|((t, _), _)| *t == target)
            .map(|((_, key), (shape, mods))| {
                let base = f32_view.get_any_shape(key)?;
                let fused = add_update(base, w.is_computed(key), mods, shape)?;
                Ok((key.clone(), fused.to_dtype(w.dtype())?))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(if overrides.is_empty() {
            w.clone()
        } else {
            w.with_overrides(overrides)
        })
    })?;
    tracing::info!(
        layers = report.layers,
        seconds = start.elapsed().as_secs_f64(),
        "LoRAs fused"
    );
    Ok((fused, report))
}

/// Attaches `loras` as runtime (unfused) branches: each adapted layer computes
/// `W x + Σᵢ weightᵢ · scaleᵢ · upᵢ(downᵢ(x))`. Same checks as [`fuse`]; `parts` is unchanged.
pub fn runtime(parts: &ModelParts, loras: &[(LoraFile, f64)]) -> Result<(ModelParts, FuseReport)> {
    let (placed, report) = place(parts, loras)?;
    let layers = by_layer(&placed, loras);
    let out = with_views(parts, |target, w| {
        let mut branches: HashMap<String, Vec<LoraBranch>> = HashMap::new();
        for ((t, key), (_, mods)) in &layers {
            if *t != target {
                continue;
            }
            branches.insert(
                key.clone(),
                mods.iter()
                    .map(|(m, s)| LoraBranch {
                        down: m.down.clone(),
                        up: m.up.clone(),
                        scale: *s,
                    })
                    .collect(),
            );
        }
        Ok(if branches.is_empty() {
            w.clone()
        } else {
            w.with_lora_branches(branches)
        })
    })?;
    Ok((out, report))
}

/// Opens each LoRA of `specs` and fuses (or, with `runtime_mode`, attaches) them.
pub fn apply_specs(
    parts: &ModelParts,
    specs: &[super::LoraSpec],
    runtime_mode: bool,
) -> Result<(ModelParts, FuseReport)> {
    let loras = specs
        .iter()
        .map(|s| Ok((LoraFile::open(&s.path)?, s.weight)))
        .collect::<Result<Vec<_>>>()?;
    if runtime_mode {
        runtime(parts, &loras)
    } else {
        fuse(parts, &loras)
    }
}
