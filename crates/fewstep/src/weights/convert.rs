//! Storage-dtype conversion of a diffusers pipeline folder (what diffusers does with
//! `from_pretrained(..., torch_dtype=torch.float16).save_pretrained(...)`) or of one `.safetensors` file.

use std::path::Path;

use candle_core::{DType, Device};

use super::safetensors::write_safetensors;
use super::SafetensorsFile;
use crate::files::write_atomic;
use crate::{Error, Result};

/// What [`convert_pipeline_folder`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertReport {
    /// `.safetensors` files rewritten.
    pub weight_files: usize,
    /// Floating-point tensors converted.
    pub tensors: usize,
    /// Other files copied (configs, tokenizer files).
    pub copied: usize,
}

/// Copies the pipeline folder `src` (its `model_index.json` and every component folder; other files at
/// the top, such as a training checkpoint, are left out) to `dst`, with every floating-point tensor of
/// every `.safetensors` file stored as `dtype` (integer tensors unchanged, metadata kept). Each file is
/// written atomically. `dst` must not be `src`.
pub fn convert_pipeline_folder(src: &Path, dst: &Path, dtype: DType) -> Result<ConvertReport> {
    check_float(dtype)?;
    let index = src.join("model_index.json");
    if !index.is_file() {
        return Err(Error::Missing {
            path: src.to_path_buf(),
            what: "model_index.json (not a diffusers pipeline folder)".into(),
        });
    }
    if same_place(src, dst) {
        return Err(Error::invalid(
            "output",
            format!("{} is the input folder", dst.display()),
        ));
    }
    let mut report = ConvertReport::default();
    mkdir(dst)?;
    copy_file(&index, &dst.join("model_index.json"))?;
    report.copied += 1;
    for entry in read_dir(src)? {
        if entry.is_dir() {
            convert_tree(
                &entry,
                &dst.join(entry.file_name().unwrap()),
                dtype,
                &mut report,
            )?;
        }
    }
    Ok(report)
}

/// Rewrites one `.safetensors` file (a LoRA, a single-file checkpoint, a component's weights) with every
/// floating-point tensor stored as `dtype`, integer tensors and metadata unchanged, atomically. Returns
/// the number of tensors converted. `dst` must not be `src`.
pub fn convert_file(src: &Path, dst: &Path, dtype: DType) -> Result<usize> {
    check_float(dtype)?;
    if same_place(src, dst) {
        return Err(Error::invalid(
            "output",
            format!("{} is the input file", dst.display()),
        ));
    }
    let file = SafetensorsFile::open(src)?;
    let mut names: Vec<&String> = file.tensors().keys().collect();
    names.sort();
    let mut converted = 0;
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = file.load(name, &Device::Cpu)?;
        let t = if t.dtype().is_float() {
            converted += 1;
            t.to_dtype(dtype)?
        } else {
            t
        };
        tensors.push((name.clone(), t));
    }
    let meta = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    write_safetensors(dst, &tensors, &meta)?;
    Ok(converted)
}

fn check_float(dtype: DType) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(Error::invalid(
            "dtype",
            format!("{dtype:?} is not a floating-point type"),
        ))
    }
}

fn same_place(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn read_dir(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        out.push(e.map_err(|e| Error::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(|e| Error::io(from, e))?;
    write_atomic(to, |w| w.write_all(&bytes))
}

fn convert_tree(src: &Path, dst: &Path, dtype: DType, report: &mut ConvertReport) -> Result<()> {
    mkdir(dst)?;
    for path in read_dir(src)? {
        let target = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            convert_tree(&path, &target, dtype, report)?;
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            report.tensors += convert_file(&path, &target, dtype)?;
            report.weight_files += 1;
        } else if path.is_file() {
            copy_file(&path, &target)?;
            report.copied += 1;
        }
    }
    Ok(())
}
