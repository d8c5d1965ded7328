//! Model weights as one in-memory safetensors blob: what the learner publishes and a worker applies.
//! Names are the legacy HF names (`visual.*`, `model.*`, `lm_head.*`), the ones `Weights` uses in
//! memory, so a blob written to disk as `model.safetensors` also loads in transformers.

use std::collections::{BTreeMap, HashMap};

use bytes::{Bytes, BytesMut};
use candle_core::safetensors::Load;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use medrl_model::config::Config;
use medrl_model::weights::{Weights, expected_shapes, legacy_name};

use crate::error::{Result, WeightSyncError};

/// The blob format named in every chunk and publication.
pub const FORMAT: &str = "safetensors";

/// Float dtypes a blob may carry; integer tensors are never model weights.
fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

/// Serialises every tensor of `weights` in `dtype` as one safetensors buffer, byte for byte what
/// `safetensors::serialize` writes (tensors by name, header padded to 8 bytes). Each tensor is
/// converted and copied straight into its place in the blob, one at a time: the blob is the only
/// allocation of its size, where `serialize` over candle tensors copies every tensor twice more
/// (`View::data` owns a copy) and faults in the memory of each copy.
pub fn encode_weights(weights: &Weights, dtype: DType) -> Result<Bytes> {
    encode_weights_into(weights, dtype, BytesMut::new())
}

/// [`encode_weights`] into `buffer`: an earlier blob's memory ([`crate::reusable_buffer`],
/// [`crate::WeightPublisher::spare_buffer`]) is written over without the page faults of fresh
/// memory, a learner's cost at every step otherwise.
pub fn encode_weights_into(weights: &Weights, dtype: DType, mut buffer: BytesMut) -> Result<Bytes> {
    let _span = tracing::debug_span!("encode_weights", tensors = weights.len(), dtype = ?dtype).entered();
    if !is_float(dtype) {
        return Err(WeightSyncError::Config { field: "dtype", problem: format!("{dtype:?} is not a float dtype") });
    }
    let mut tensors: Vec<(&String, &Tensor)> = weights.iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0;
    for (name, tensor) in &tensors {
        let len = tensor.elem_count() * dtype.size_in_bytes();
        infos.push(((*name).clone(), TensorInfo { dtype: dtype.into(), shape: tensor.dims().to_vec(), data_offsets: (offset, offset + len) }));
        offset += len;
    }
    // "format: pt" is what transformers expects when the blob is saved as a file.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let header = Metadata::new(Some(metadata), infos).map_err(|e| WeightSyncError::Encode { name: "(header)".into(), problem: e.to_string() })?;
    let mut header = serde_json::to_vec(&header).map_err(|e| WeightSyncError::Encode { name: "(header)".into(), problem: e.to_string() })?;
    header.resize(header.len().next_multiple_of(8), b' ');
    buffer.clear();
    buffer.reserve(8 + header.len() + offset);
    buffer.extend_from_slice(&(header.len() as u64).to_le_bytes());
    buffer.extend_from_slice(&header);
    for (name, tensor) in tensors {
        append_bytes(&mut buffer, tensor, dtype).map_err(|e| WeightSyncError::Encode { name: name.clone(), problem: e.to_string() })?;
    }
    Ok(buffer.freeze())
}

/// Appends `tensor`'s elements in `dtype`, little-endian, as safetensors stores them.
fn append_bytes(out: &mut BytesMut, tensor: &Tensor, dtype: DType) -> candle_core::Result<()> {
    // Free for a contiguous CPU tensor already in `dtype`, the learner's usual case on the CPU;
    // a GPU tensor comes over once.
    let tensor = tensor.to_dtype(dtype)?.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    let range = layout.start_offset()..layout.start_offset() + layout.shape().elem_count();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => out.extend_from_slice(bytemuck::cast_slice(&v[range])),
        Storage::Cpu(CpuStorage::BF16(v)) => out.extend_from_slice(bytemuck::cast_slice(&v[range])),
        Storage::Cpu(CpuStorage::F16(v)) => out.extend_from_slice(bytemuck::cast_slice(&v[range])),
        Storage::Cpu(CpuStorage::F64(v)) => out.extend_from_slice(bytemuck::cast_slice(&v[range])),
        _ => candle_core::bail!("expected a float tensor on the CPU, got {:?} on {:?}", tensor.dtype(), tensor.device().location()),
    }
    Ok(())
}

/// Reads a blob written by [`encode_weights`] (or any HF safetensors file of this model), checks
/// every tensor against `config` as `Weights::load` does, and converts to `dtype` on `device`.
/// Missing, misshaped, duplicated or non-float tensors are errors; tensors the model does not use
/// are dropped with a warning.
pub fn decode_weights(blob: &[u8], config: &Config, dtype: DType, device: &Device) -> Result<Weights> {
    let _span = tracing::debug_span!("decode_weights", bytes = blob.len(), dtype = ?dtype).entered();
    let file = safetensors::SafeTensors::deserialize(blob).map_err(|e| WeightSyncError::Blob(format!("not a readable safetensors buffer: {e}")))?;
    let expected: BTreeMap<String, Vec<usize>> = expected_shapes(config).into_iter().collect();
    let mut found: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut ignored = Vec::new();
    for (key, view) in file.tensors() {
        let name = legacy_name(&key);
        let Some(shape) = expected.get(&name) else {
            // A tied model may still carry lm_head (it equals the embedding): dropped quietly.
            if !(config.tie_word_embeddings && name == "lm_head.weight") {
                ignored.push(name);
            }
            continue;
        };
        let bad = |problem: String| WeightSyncError::Tensor { name: name.clone(), problem };
        if view.shape() != shape.as_slice() {
            return Err(bad(format!("shape {:?}, expected {:?} from config.json", view.shape(), shape)));
        }
        // Checking the shape before loading means a bad blob costs no tensor copies.
        let tensor = view.load(&Device::Cpu).map_err(|e| bad(format!("unreadable: {e}")))?;
        if !is_float(tensor.dtype()) {
            return Err(bad(format!("stored as {:?}; expected a float dtype", tensor.dtype())));
        }
        let tensor = tensor.to_dtype(dtype)?.to_device(device)?;
        if found.insert(name.clone(), tensor).is_some() {
            return Err(bad("stored twice (under both key styles)".into()));
        }
    }
    let missing: Vec<&String> = expected.keys().filter(|n| !found.contains_key(*n)).collect();
    if let Some(first) = missing.first() {
        return Err(WeightSyncError::Tensor { name: (*first).clone(), problem: format!("missing from the blob ({} missing in all)", missing.len()) });
    }
    if !ignored.is_empty() {
        tracing::warn!(count = ignored.len(), first = %ignored[0], "ignoring blob tensors that Qwen2.5-VL does not use");
    }
    Ok(Weights::from_tensors(found))
}

#[cfg(test)]
mod tests {
    use medrl_model::tiny::{TinySpec, create_tiny};

    use super::*;

    fn tiny() -> (tempfile::TempDir, Config, Weights) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = create_tiny(dir.path(), &TinySpec::default()).expect("tiny model");
        let weights = Weights::random(&config, 3, DType::F32, &Device::Cpu).expect("weights");
        (dir, config, weights)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()).expect("diff")
    }

    #[test]
    fn round_trip_is_exact_in_f32_and_rounds_in_bf16() -> Result<()> {
        let (_dir, config, weights) = tiny();
        let blob = encode_weights(&weights, DType::F32)?;
        let back = decode_weights(&blob, &config, DType::F32, &Device::Cpu)?;
        assert_eq!(back.len(), weights.len());
        for (name, t) in weights.iter() {
            assert_eq!(max_diff(t, back.get(name).expect("present")), 0.0, "{name}");
        }
        let half = encode_weights(&weights, DType::BF16)?;
        assert!(half.len() < blob.len() * 6 / 10, "bf16 blob should be about half the f32 one");
        let back = decode_weights(&half, &config, DType::F32, &Device::Cpu)?;
        for (name, t) in weights.iter() {
            let want = t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            assert_eq!(max_diff(&want, back.get(name).expect("present")), 0.0, "{name}");
        }
        // Encoding is deterministic, so equal weights give equal checksums.
        assert_eq!(encode_weights(&weights, DType::F32)?, blob);
        Ok(())
    }

    #[test]
    fn blobs_are_byte_for_byte_what_safetensors_writes() -> Result<()> {
        let (_dir, _config, weights) = tiny();
        // A strided view (a transpose) must be written in its logical order, as serialize does.
        let mut weights = weights;
        let square = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((3, 4))?.t()?;
        weights.insert("extra.transposed", square);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let converted: Vec<(String, Tensor)> = weights.iter().map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?.contiguous()?))).collect::<candle_core::Result<_>>()?;
            let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
            let reference = safetensors::serialize(converted.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata)).expect("serialize");
            assert!(encode_weights(&weights, dtype)?.as_ref() == reference.as_slice(), "{dtype:?} blob differs from safetensors::serialize");
        }
        Ok(())
    }

    #[test]
    fn encoding_into_an_old_blob_reuses_its_memory() -> Result<()> {
        let (_dir, _config, weights) = tiny();
        let old = encode_weights(&weights, DType::F32)?;
        let address = old.as_ptr();
        let half = encode_weights_into(&weights, DType::BF16, crate::reusable_buffer(old))?;
        assert_eq!(half.as_ptr(), address, "the bf16 blob must be written over the f32 one");
        assert_eq!(half, encode_weights(&weights, DType::BF16)?);
        Ok(())
    }

    #[test]
    fn missing_misshaped_and_garbage_blobs_are_named() -> Result<()> {
        let (_dir, config, weights) = tiny();
        let mut partial = Weights::default();
        for (name, t) in weights.iter().filter(|(n, _)| n.as_str() != "model.norm.weight") {
            partial.insert(name.clone(), t.clone());
        }
        let msg = decode_weights(&encode_weights(&partial, DType::F32)?, &config, DType::F32, &Device::Cpu).expect_err("missing").to_string();
        assert!(msg.contains("model.norm.weight") && msg.contains("missing"), "{msg}");

        partial.insert("model.norm.weight", Tensor::zeros(3, DType::F32, &Device::Cpu)?);
        let msg = decode_weights(&encode_weights(&partial, DType::F32)?, &config, DType::F32, &Device::Cpu).expect_err("shape").to_string();
        assert!(msg.contains("model.norm.weight") && msg.contains("shape"), "{msg}");

        let blob = encode_weights(&weights, DType::F32)?;
        let msg = decode_weights(&blob[..blob.len() / 2], &config, DType::F32, &Device::Cpu).expect_err("truncated").to_string();
        assert!(msg.contains("safetensors"), "{msg}");
        assert!(decode_weights(b"not a blob at all", &config, DType::F32, &Device::Cpu).is_err());
        assert!(encode_weights(&weights, DType::U32).is_err());
        Ok(())
    }
}
