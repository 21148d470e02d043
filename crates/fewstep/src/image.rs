//! Images: PNG reading and writing (with the A1111 `parameters` text chunk), and conversion between
//! 8-bit RGB images and the `[-1, 1]` tensors the VAE reads and writes, with diffusers'
//! `VaeImageProcessor` arithmetic.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::files::write_atomic;
use crate::{Error, Result};

/// The text-chunk keyword under which A1111 (and fewstep) store the generation parameters.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// An 8-bit RGB image, row-major, `data.len() == width * height * 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// A `width × height` image filled with black.
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0; width * height * 3],
        }
    }

    /// The `[r, g, b]` pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    fn check(&self) -> Result<()> {
        if self.data.len() != self.width * self.height * 3 {
            return Err(Error::invalid(
                "image",
                format!(
                    "{}x{} RGB needs {} bytes, got {}",
                    self.width,
                    self.height,
                    self.width * self.height * 3,
                    self.data.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Lays pictures of one size out in rows of `cols`, with a 2-pixel white gap after each.
pub fn grid(pictures: &[RgbImage], cols: usize) -> Result<RgbImage> {
    const GAP: usize = 2;
    let Some(first) = pictures.first() else {
        return Err(Error::invalid("grid", "no pictures to lay out"));
    };
    let (w, h) = (first.width, first.height);
    if cols == 0 || pictures.iter().any(|p| (p.width, p.height) != (w, h)) {
        return Err(Error::invalid(
            "grid",
            format!("needs at least one column and pictures of one size ({w}x{h})"),
        ));
    }
    let rows = pictures.len().div_ceil(cols);
    let mut canvas = RgbImage::new(cols * (w + GAP), rows * (h + GAP));
    canvas.data.fill(255);
    for (i, p) in pictures.iter().enumerate() {
        let (x0, y0) = ((i % cols) * (w + GAP), (i / cols) * (h + GAP));
        for y in 0..h {
            let dst = ((y0 + y) * canvas.width + x0) * 3;
            canvas.data[dst..dst + w * 3].copy_from_slice(&p.data[y * w * 3..(y + 1) * w * 3]);
        }
    }
    Ok(canvas)
}

/// The picture enlarged `k` times by repeating pixels (nearest neighbour), to look at small pictures.
pub fn upscale(img: &RgbImage, k: usize) -> RgbImage {
    let mut out = RgbImage::new(img.width * k, img.height * k);
    for y in 0..out.height {
        for x in 0..out.width {
            let i = (y * out.width + x) * 3;
            out.data[i..i + 3].copy_from_slice(&img.pixel(x / k, y / k));
        }
    }
    out
}

/// Checks `t` is `[B, 3, H, W]` and returns it as f32 on the CPU with its dims.
fn to_cpu_f32(t: &Tensor) -> Result<(Tensor, (usize, usize, usize, usize))> {
    let dims = t.dims4()?;
    if dims.1 != 3 {
        return Err(Error::invalid(
            "image tensor",
            format!("expected [B, 3, H, W], got {:?}", t.dims()),
        ));
    }
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    Ok((t, dims))
}

/// `[B, 3, H, W]` in `[-1, 1]` → per image, `(x / 2 + 0.5).clamp(0, 1)` in f32, as `[H, W, 3]`
/// (row-major, interleaved RGB) values — diffusers' `postprocess(output_type="np")`.
pub fn tensor_to_float_images(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    let (t, (b, _, h, w)) = to_cpu_f32(t)?;
    let t = ((t * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    let t = t.permute((0, 2, 3, 1))?.contiguous()?;
    let flat = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(flat.chunks(h * w * 3).take(b).map(|c| c.to_vec()).collect())
}

/// `[B, 3, H, W]` in `[-1, 1]` → 8-bit images: `(x / 2 + 0.5).clamp(0, 1)`, then
/// `round(x * 255)` with ties to even, all in f32 — diffusers' `denormalize` + `numpy_to_pil`.
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    let (_, _, h, w) = t.dims4()?;
    Ok(tensor_to_float_images(t)?
        .into_iter()
        .map(|v| RgbImage {
            width: w,
            height: h,
            data: v
                .iter()
                .map(|&x| (x * 255.0).round_ties_even() as u8)
                .collect(),
        })
        .collect())
}

/// Images of one size → `[B, 3, H, W]` in `dtype` on `device`, each value `x / 255 * 2 − 1` computed in
/// f32 — diffusers' `VaeImageProcessor` (`pil_to_numpy`, then `normalize`).
pub fn images_to_tensor(imgs: &[RgbImage], dtype: DType, device: &Device) -> Result<Tensor> {
    let first = imgs
        .first()
        .ok_or_else(|| Error::invalid("images", "no image given"))?;
    let (w, h) = (first.width, first.height);
    let mut data = Vec::with_capacity(imgs.len() * w * h * 3);
    for (i, img) in imgs.iter().enumerate() {
        img.check()?;
        if (img.width, img.height) != (w, h) {
            return Err(Error::invalid(
                "images",
                format!(
                    "image {i} is {}x{}, image 0 is {w}x{h}; a batch needs one size",
                    img.width, img.height
                ),
            ));
        }
        data.extend(img.data.iter().map(|&v| 2.0 * (v as f32 / 255.0) - 1.0));
    }
    let t = Tensor::from_vec(data, (imgs.len(), h, w, 3), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .contiguous()?
        .to_dtype(dtype)?
        .to_device(device)?;
    Ok(t)
}

fn png_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid(
        "image",
        format!("{}: not a readable PNG: {e}", path.display()),
    )
}

fn open_png(path: &Path) -> Result<png::Reader<BufReader<File>>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    decoder.read_info().map_err(|e| png_err(path, e))
}

/// Reads a PNG as 8-bit RGB: RGB as is, RGBA and gray+alpha with the alpha dropped, gray replicated,
/// palette expanded, 16-bit reduced to 8 (the high byte). Errors name the file.
pub fn read_png(path: &Path) -> Result<RgbImage> {
    let mut reader = open_png(path)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| png_err(path, "image too large"))?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(|e| png_err(path, e))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let buf = &buf[..info.buffer_size()];
    if info.bit_depth != png::BitDepth::Eight {
        return Err(png_err(
            path,
            format!("unexpected bit depth {:?} after expansion", info.bit_depth),
        ));
    }
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => {
            return Err(png_err(path, "palette image was not expanded"));
        }
    };
    let row_bytes = info.line_size;
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let row = &buf[y * row_bytes..y * row_bytes + w * channels];
        for px in row.chunks_exact(channels) {
            match channels {
                1 | 2 => data.extend_from_slice(&[px[0], px[0], px[0]]),
                _ => data.extend_from_slice(&px[..3]),
            }
        }
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// The text of the PNG's `parameters` chunk (tEXt, zTXt or iTXt, before or after the image data), or
/// `None` if it has none. Errors name the file.
pub fn read_parameters(path: &Path) -> Result<Option<String>> {
    let mut reader = open_png(path)?;
    let find = |info: &png::Info| -> Result<Option<String>> {
        if let Some(c) = info
            .uncompressed_latin1_text
            .iter()
            .find(|c| c.keyword == PARAMETERS_KEYWORD)
        {
            return Ok(Some(c.text.clone()));
        }
        if let Some(c) = info
            .compressed_latin1_text
            .iter()
            .find(|c| c.keyword == PARAMETERS_KEYWORD)
        {
            return c.get_text().map(Some).map_err(|e| png_err(path, e));
        }
        if let Some(c) = info
            .utf8_text
            .iter()
            .find(|c| c.keyword == PARAMETERS_KEYWORD)
        {
            return c.get_text().map(Some).map_err(|e| png_err(path, e));
        }
        Ok(None)
    };
    if let Some(t) = find(reader.info())? {
        return Ok(Some(t));
    }
    // Text chunks after the image data are only seen once the frame has been read.
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| png_err(path, "image too large"))?;
    let mut buf = vec![0u8; size];
    reader.next_frame(&mut buf).map_err(|e| png_err(path, e))?;
    reader.finish().map_err(|e| png_err(path, e))?;
    find(reader.info())
}

/// The PNG bytes of `img`, with the `parameters` text chunk if given.
fn encode_png(
    img: &RgbImage,
    parameters: Option<&str>,
) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, img.width as u32, img.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    if let Some(text) = parameters {
        // As PIL does for A1111: tEXt when the text is Latin-1, else iTXt (UTF-8).
        if text.chars().all(|c| (c as u32) < 256) {
            encoder.add_text_chunk(PARAMETERS_KEYWORD.into(), text.into())?;
        } else {
            encoder.add_itxt_chunk(PARAMETERS_KEYWORD.into(), text.into())?;
        }
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&img.data)?;
    writer.finish()?;
    Ok(bytes)
}

/// Writes `img` as an 8-bit RGB PNG, with `parameters` (if given) in a text chunk of that keyword (A1111's
/// convention). The file is written under a temporary name in the same folder and renamed into place, so
/// `path` is either absent, the old file, or the complete new one. Errors name the file.
pub fn write_png(path: &Path, img: &RgbImage, parameters: Option<&str>) -> Result<()> {
    img.check()?;
    if img.width == 0 || img.height == 0 {
        return Err(Error::invalid("image", "cannot write an empty image"));
    }
    let bytes = encode_png(img, parameters).map_err(|e| {
        Error::io(
            path,
            std::io::Error::other(format!("PNG encoding failed: {e}")),
        )
    })?;
    write_atomic(path, |w| w.write_all(&bytes))
}
