//! A validating, memory-mapped reader of the `.safetensors` format: an 8-byte little-endian header
//! length `n`, `n` bytes of JSON mapping each tensor name to `{dtype, shape, data_offsets: [begin, end]}`
//! (offsets relative to the byte after the header), then the data. Every offset and size is checked
//! before any tensor is read, so a truncated or corrupt file gives an error naming the file and the tensor.
//! [`write_safetensors`] writes the same format.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use serde_json::Value;

use crate::files::write_atomic;
use crate::{Error, Result};

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: std::ops::Range<usize>,
}

/// An opened, validated `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, TensorInfo>,
    /// The header's `__metadata__` string map (empty when absent).
    metadata: HashMap<String, String>,
}

/// Bytes per element of the safetensors dtypes fewstep does not read (integer counters and flags that
/// checkpoints carry beside the weights); they are validated and then left out.
fn other_dtype_size(name: &str) -> Option<usize> {
    Some(match name {
        "BOOL" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" => 2,
        "U64" => 8,
        _ => return None,
    })
}

fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U8" => DType::U8,
        "U32" => DType::U32,
        _ => return None,
    })
}

/// Refuses PyTorch pickles by extension before anything is read from them.
pub fn refuse_pickle(path: &Path, hint: &str) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if matches!(ext.as_str(), "ckpt" | "bin" | "pt" | "pth" | "pkl") {
        return Err(Error::Pickle {
            path: path.to_path_buf(),
            hint: hint.to_string(),
        });
    }
    Ok(())
}

impl SafetensorsFile {
    /// Opens and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        refuse_pickle(
            path,
            "convert it to .safetensors, or use the .safetensors file beside it",
        )?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; the file is not expected to change while loaded.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (tensors, metadata) = parse_header(&mmap).map_err(|reason| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &HashMap<String, TensorInfo> {
        &self.tensors
    }

    /// The header's `__metadata__` (string keys and values; non-string values are skipped).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Reads tensor `key` onto `device`, in its storage dtype.
    pub fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        let info = self.tensors.get(key).ok_or_else(|| Error::MissingKey {
            file: self.path.display().to_string(),
            key: key.to_string(),
        })?;
        let bytes = &self.mmap[info.range.clone()];
        Ok(Tensor::from_raw_buffer(
            bytes,
            info.dtype,
            &info.shape,
            device,
        )?)
    }
}

type Header = (HashMap<String, TensorInfo>, HashMap<String, String>);

fn parse_header(buf: &[u8]) -> std::result::Result<Header, String> {
    if buf.len() < 8 {
        return Err(format!(
            "file is {} bytes, shorter than the 8-byte header length",
            buf.len()
        ));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
    let data_start = 8usize
        .checked_add(n)
        .filter(|&end| end <= buf.len())
        .ok_or_else(|| {
            format!(
                "header claims {n} bytes but the file has only {} after the length (truncated?)",
                buf.len() - 8
            )
        })?;
    let header: HashMap<String, Value> = serde_json::from_slice(&buf[8..data_start])
        .map_err(|e| format!("header is not a JSON object: {e}"))?;
    let data_len = buf.len() - data_start;
    let mut tensors = HashMap::with_capacity(header.len());
    let mut metadata = HashMap::new();
    for (name, v) in header {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, v) in m {
                    if let Some(s) = v.as_str() {
                        metadata.insert(k.clone(), s.to_string());
                    }
                }
            }
            continue;
        }
        let dtype_name = v["dtype"]
            .as_str()
            .ok_or_else(|| format!("tensor `{name}`: no dtype"))?;
        let dtype = dtype_of(dtype_name);
        let elem_size = dtype
            .map(|d| d.size_in_bytes())
            .or_else(|| other_dtype_size(dtype_name))
            .ok_or_else(|| format!("tensor `{name}`: unknown dtype {dtype_name}"))?;
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| format!("tensor `{name}`: shape is not a list of sizes"))?;
        let offsets: Vec<usize> = v["data_offsets"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .filter(|o: &Vec<usize>| o.len() == 2)
            .ok_or_else(|| format!("tensor `{name}`: data_offsets is not [begin, end]"))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if begin > end || end > data_len {
            return Err(format!(
                "tensor `{name}`: data offsets [{begin}, {end}] run past the {data_len} data bytes of the file (truncated?)"
            ));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: shape {shape:?} overflows"))?;
        if numel * elem_size != end - begin {
            return Err(format!(
                "tensor `{name}`: shape {shape:?} of {dtype_name} needs {} bytes, offsets give {}",
                numel * elem_size,
                end - begin
            ));
        }
        let Some(dtype) = dtype else {
            tracing::debug!("skipping tensor `{name}` of dtype {dtype_name}");
            continue;
        };
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                range: data_start + begin..data_start + end,
            },
        );
    }
    Ok((tensors, metadata))
}

fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        other => {
            return Err(Error::invalid(
                "dtype",
                format!("{other:?} cannot be written to .safetensors here"),
            ))
        }
    })
}

/// The little-endian bytes of a tensor.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        DType::U32 => t
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => {
            return Err(Error::invalid(
                "dtype",
                format!("{other:?} cannot be written to .safetensors here"),
            ))
        }
    })
}

/// Writes tensors as a `.safetensors` file (header keys sorted, data in that order, header padded with
/// spaces to a multiple of 8 bytes), atomically through [`write_atomic`].
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap(),
        );
    }
    let mut blobs = Vec::with_capacity(sorted.len());
    let mut offset = 0usize;
    for (name, t) in sorted {
        let bytes = tensor_bytes(t)?;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype_name(t.dtype())?,
                "shape": t.dims(),
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
        blobs.push(bytes);
    }
    let mut head = serde_json::to_string(&header).unwrap().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    write_atomic(path, |w| {
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for b in &blobs {
            w.write_all(b)?;
        }
        Ok(())
    })
}
