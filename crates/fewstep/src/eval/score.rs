//! Scores of a generator on the toy world, measured with the world classifier ([`super::classifier`]):
//!
//! - **FID**: the Fréchet distance between the classifier's penultimate features of the generated
//!   pictures and of real pictures of the same style ([`super::frechet`]);
//! - **adherence**: the share of pictures in which the classifier finds every shape and colour its caption
//!   names and the caption's background ([`Labels::adheres`]); **background**: the share with the caption's
//!   background alone (what a model that cannot yet draw the shapes gets right);
//! - **outline share**: the share the classifier judges drawn in the outline style.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::classifier::{Labels, WorldClassifier};
use super::frechet::{frechet_distance, moments};
use crate::image::{images_to_tensor, RgbImage};
use crate::world::{scenes, Style};
use crate::{Error, Result};

/// Images per classifier call.
const CHUNK: usize = 256;

/// The classifier's features `[n][128]` and predicted labels of pictures, computed in chunks.
pub fn classify(
    classifier: &WorldClassifier,
    images: &[RgbImage],
    device: &Device,
) -> Result<(Vec<Vec<f32>>, Vec<Labels>)> {
    let mut features = Vec::with_capacity(images.len());
    let mut labels = Vec::with_capacity(images.len());
    for chunk in images.chunks(CHUNK) {
        let x = images_to_tensor(chunk, DType::F32, device)?;
        let f = classifier.features(&x)?;
        labels.extend(classifier.predict_features(&f)?);
        features.extend(f.to_vec2::<f32>()?);
    }
    Ok((features, labels))
}

/// The feature statistics of real pictures: mean and covariance of the classifier's features.
#[derive(Debug, Clone)]
pub struct Reference {
    pub count: usize,
    pub mean: Vec<f64>,
    pub cov: Vec<f64>,
}

impl Reference {
    /// Renders `count` real scenes of `style` (seed `seed`, `side`×`side`) and fits their features.
    pub fn measure(
        classifier: &WorldClassifier,
        style: Style,
        seed: u64,
        count: usize,
        side: usize,
        device: &Device,
    ) -> Result<Self> {
        if count < 2 {
            return Err(Error::invalid(
                "real images",
                format!("need at least 2 for a covariance, got {count}"),
            ));
        }
        let images: Vec<RgbImage> = scenes(seed, count, style)
            .iter()
            .map(|s| s.render(side))
            .collect();
        let (features, _) = classify(classifier, &images, device)?;
        let (mean, cov) = moments(&features)?;
        Ok(Self { count, mean, cov })
    }
}

/// The scores of one set of generated pictures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scores {
    pub count: usize,
    pub fid: f64,
    pub adherence: f64,
    pub background: f64,
    pub outline_share: f64,
}

/// Scores pictures against the labels of the scenes whose captions prompted them.
pub fn score(
    classifier: &WorldClassifier,
    reference: &Reference,
    images: &[RgbImage],
    asked: &[Labels],
    device: &Device,
) -> Result<Scores> {
    if images.len() != asked.len() {
        return Err(Error::invalid(
            "labels",
            format!("{} pictures but {} captions", images.len(), asked.len()),
        ));
    }
    if images.len() < 2 {
        return Err(Error::invalid(
            "pictures",
            format!("need at least 2 for a covariance, got {}", images.len()),
        ));
    }
    let (features, found) = classify(classifier, images, device)?;
    let (mean, cov) = moments(&features)?;
    let n = images.len() as f64;
    let adhering = asked
        .iter()
        .zip(&found)
        .filter(|(a, f)| a.adheres(f))
        .count();
    let background = asked
        .iter()
        .zip(&found)
        .filter(|(a, f)| a.background == f.background)
        .count();
    let outline = found.iter().filter(|f| f.outline).count();
    Ok(Scores {
        count: images.len(),
        fid: frechet_distance(&mean, &cov, &reference.mean, &reference.cov),
        adherence: adhering as f64 / n,
        background: background as f64 / n,
        outline_share: outline as f64 / n,
    })
}
