//! A small convolutional classifier of the toy world — fewstep's stand-in for Inception: its
//! penultimate features feed the Fréchet distance, and its predictions judge whether a picture shows
//! what its caption asks for.
//!
//! Architecture (input `[B, 3, S, S]` in [−1, 1]): five 3×3 convolutions with SiLU, the 2nd to 4th with
//! stride 2 (`3 → 32 → 64 → 128 → 128 → 128` channels; at 32×32 the last one sees the whole picture), a
//! global maximum over the pixels (the 128 features: "is this anywhere", which a mean would dilute for
//! small shapes), and a linear head to 26 logits: 4 shapes and 10 colours *present* (multi-label, sigmoid), the background
//! colour (10-way softmax) and the style (filled / outline). Loss: binary cross-entropy on the presence
//! labels plus cross-entropy on background and style.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::image::images_to_tensor;
use crate::models::nn::{conv2d, linear, Conv2d, Linear};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::params::{discover_shapes, ParamStore};
use crate::train::TrainRng;
use crate::weights::Weights;
use crate::world::{Scene, Shape, Style, COLOURS};
use crate::{Error, Result};

/// Feature width (the penultimate layer).
pub const FEATURES: usize = 128;
const CHANNELS: [usize; 5] = [32, 64, 128, 128, 128];
const STRIDES: [usize; 5] = [1, 2, 2, 2, 1];
const N_SHAPES: usize = 4;
const N_COLOURS: usize = 10;
const LOGITS: usize = N_SHAPES + 2 * N_COLOURS + 2;

/// What a picture of a scene shows, as the classifier's targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    /// Which of [`Shape::ALL`] are drawn.
    pub shapes: [bool; N_SHAPES],
    /// Which of [`COLOURS`] some shape has.
    pub colours: [bool; N_COLOURS],
    /// Index into [`COLOURS`].
    pub background: usize,
    pub outline: bool,
}

impl Labels {
    pub fn of(scene: &Scene) -> Self {
        let mut shapes = [false; N_SHAPES];
        let mut colours = [false; N_COLOURS];
        for o in &scene.objects {
            shapes[Shape::ALL.iter().position(|&s| s == o.shape).unwrap()] = true;
            colours[COLOURS.iter().position(|&c| c == o.colour).unwrap()] = true;
        }
        Self {
            shapes,
            colours,
            background: COLOURS.iter().position(|&c| c == scene.background).unwrap(),
            outline: scene.style == Style::Outline,
        }
    }

    /// Whether a prediction agrees with these labels on what a caption asks: every shape and every
    /// colour asked for is present, and the background is right (the style is judged apart).
    pub fn adheres(&self, predicted: &Labels) -> bool {
        let covers = |want: &[bool], got: &[bool]| want.iter().zip(got).all(|(&w, &g)| !w || g);
        covers(&self.shapes, &predicted.shapes)
            && covers(&self.colours, &predicted.colours)
            && self.background == predicted.background
    }
}

/// Training settings of the classifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub seed: u64,
    /// Images per style (both styles are used).
    pub images_per_style: usize,
    pub side: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub optim: AdamWConfig,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            seed: 99,
            images_per_style: 2000,
            side: 32,
            steps: 1500,
            batch_size: 32,
            optim: AdamWConfig {
                lr: 1e-3,
                ..AdamWConfig::default()
            },
        }
    }
}

/// The classifier network.
pub struct WorldClassifier {
    convs: Vec<Conv2d>,
    head: Linear,
}

impl WorldClassifier {
    pub fn new(w: &Weights) -> Result<Self> {
        let mut convs = Vec::new();
        let mut cin = 3;
        for (i, &c) in CHANNELS.iter().enumerate() {
            convs.push(conv2d(
                &w.pp(format!("convs.{i}")),
                cin,
                c,
                3,
                STRIDES[i],
                1,
            )?);
            cin = c;
        }
        Ok(Self {
            convs,
            head: linear(&w.pp("head"), FEATURES, LOGITS, true)?,
        })
    }

    /// The tensors the network reads, with their shapes.
    pub fn shapes() -> Result<BTreeMap<String, Vec<usize>>> {
        discover_shapes(|w| Self::new(w).map(|_| ()))
    }

    /// Loads a classifier written by [`ClassifierTrainer::save`].
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self> {
        Self::new(&Weights::from_files(
            &[path.to_path_buf()],
            DType::F32,
            device,
        )?)
    }

    /// The penultimate features `[B, 128]` of images `[B, 3, S, S]` in [−1, 1].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = images.clone();
        for c in &self.convs {
            x = c.forward(&x)?.silu()?;
        }
        Ok(x.flatten_from(2)?.max(D::Minus1)?)
    }

    /// The 26 logits of the features.
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.head.forward(features)?)
    }

    /// The labels read from images `[B, 3, S, S]`: presence where the logit is positive, argmax for
    /// background and style.
    pub fn predict(&self, images: &Tensor) -> Result<Vec<Labels>> {
        self.predict_features(&self.features(images)?)
    }

    /// The labels read from features `[B, 128]` (see [`Self::predict`]).
    pub fn predict_features(&self, features: &Tensor) -> Result<Vec<Labels>> {
        let logits = self.logits(features)?;
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        Ok(rows
            .iter()
            .map(|r| {
                let argmax = |v: &[f32]| {
                    v.iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map_or(0, |(i, _)| i)
                };
                let (shapes, rest) = r.split_at(N_SHAPES);
                let (colours, rest) = rest.split_at(N_COLOURS);
                let (background, style) = rest.split_at(N_COLOURS);
                Labels {
                    shapes: std::array::from_fn(|i| shapes[i] > 0.0),
                    colours: std::array::from_fn(|i| colours[i] > 0.0),
                    background: argmax(background),
                    outline: argmax(style) == 1,
                }
            })
            .collect())
    }
}

/// The targets of a batch: presence `[B, 14]` (0/1), background and style class indices `[B]`.
fn targets(labels: &[Labels], device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let b = labels.len();
    let presence: Vec<f32> = labels
        .iter()
        .flat_map(|l| l.shapes.iter().chain(&l.colours).map(|&x| x as u8 as f32))
        .collect();
    let bg: Vec<u32> = labels.iter().map(|l| l.background as u32).collect();
    let style: Vec<u32> = labels.iter().map(|l| l.outline as u32).collect();
    Ok((
        Tensor::from_vec(presence, (b, N_SHAPES + N_COLOURS), device)?,
        Tensor::from_vec(bg, b, device)?,
        Tensor::from_vec(style, b, device)?,
    ))
}

/// `mean(softplus(z) − y·z)`, the binary cross-entropy of logits `z` with targets `y`, with
/// `softplus(z) = max(z, 0) + log(1 + e^{−|z|})`.
fn bce_with_logits(z: &Tensor, y: &Tensor) -> Result<Tensor> {
    let softplus = (z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok((softplus - (z * y)?)?.mean_all()?)
}

/// `mean(logsumexp(z) − z[class])`, cross-entropy of logits `[B, K]` with class indices `[B]`.
fn cross_entropy(z: &Tensor, class: &Tensor) -> Result<Tensor> {
    let max = z.max_keepdim(D::Minus1)?.detach();
    let lse = (z
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let picked = z.contiguous()?.gather(&class.unsqueeze(1)?, 1)?;
    Ok((lse - picked)?.mean_all()?)
}

/// Training of the classifier on rendered world images of both styles.
pub struct ClassifierTrainer {
    pub config: ClassifierConfig,
    pub params: ParamStore,
    opt: AdamW,
    rng: TrainRng,
    images: Tensor,
    labels: Vec<Labels>,
}

impl ClassifierTrainer {
    pub fn new(config: ClassifierConfig, device: &Device) -> Result<Self> {
        if config.images_per_style == 0 || config.batch_size == 0 {
            return Err(Error::invalid(
                "classifier",
                "images per style and batch size must be at least 1",
            ));
        }
        let mut params = ParamStore::new(device);
        params.add_init("", &WorldClassifier::shapes()?, config.seed)?;
        let mut imgs = Vec::new();
        let mut labels = Vec::new();
        for (i, style) in [Style::Filled, Style::Outline].into_iter().enumerate() {
            for scene in
                crate::world::scenes(config.seed + i as u64, config.images_per_style, style)
            {
                imgs.push(scene.render(config.side));
                labels.push(Labels::of(&scene));
            }
        }
        let images = images_to_tensor(&imgs, DType::F32, device)?;
        let opt = AdamW::new(config.optim.clone(), &params)?;
        Ok(Self {
            rng: TrainRng::new(config.seed ^ 0x5eed),
            config,
            params,
            opt,
            images,
            labels,
        })
    }

    /// One AdamW step on a random batch; returns the loss.
    pub fn step(&mut self) -> Result<f32> {
        let b = self.config.batch_size;
        let rows: Vec<usize> = (0..b).map(|_| self.rng.below(self.labels.len())).collect();
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            b,
            self.images.device(),
        )?;
        let images = self.images.index_select(&idx, 0)?;
        let labels: Vec<Labels> = rows.iter().map(|&r| self.labels[r].clone()).collect();
        let (presence, bg, style) = targets(&labels, images.device())?;
        let net = WorldClassifier::new(&self.params.weights())?;
        let z = net.logits(&net.features(&images)?)?;
        let loss = ((bce_with_logits(&z.narrow(1, 0, N_SHAPES + N_COLOURS)?, &presence)?
            + cross_entropy(&z.narrow(1, N_SHAPES + N_COLOURS, N_COLOURS)?, &bg)?)?
            + cross_entropy(&z.narrow(1, N_SHAPES + 2 * N_COLOURS, 2)?, &style)?)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::invalid("classifier loss", format!("is {value}")));
        }
        self.opt.step(&self.params, &loss.backward()?)?;
        Ok(value)
    }

    /// The trained network.
    pub fn classifier(&self) -> Result<WorldClassifier> {
        WorldClassifier::new(&self.params.weights())
    }

    /// Writes the weights as `.safetensors`.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        self.params.save_component("", path, DType::F32)
    }
}

/// Per-head accuracy of a classifier on pictures of known scenes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accuracy {
    /// Share of scenes whose four shape-presence bits are all right.
    pub shapes: f64,
    /// Share of scenes whose ten colour-presence bits are all right.
    pub colours: f64,
    pub background: f64,
    pub style: f64,
}

impl Accuracy {
    /// Compares predictions with the true labels, head by head.
    pub fn of(truth: &[Labels], predicted: &[Labels]) -> Self {
        let n = truth.len().max(1) as f64;
        let share = |f: &dyn Fn(&Labels, &Labels) -> bool| {
            truth.iter().zip(predicted).filter(|(t, p)| f(t, p)).count() as f64 / n
        };
        Self {
            shapes: share(&|t, p| t.shapes == p.shapes),
            colours: share(&|t, p| t.colours == p.colours),
            background: share(&|t, p| t.background == p.background),
            style: share(&|t, p| t.outline == p.outline),
        }
    }
}
