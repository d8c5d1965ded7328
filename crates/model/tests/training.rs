//! The training path: gradient checkpointing gives the same gradients as the plain backward, and
//! a LoRA adapter equals its merged weight while only the adapter receives gradients.

use candle_core::{DType, Device, Tensor, Var};
use medrl_model::image::ProcessedImage;
use medrl_model::model::{Qwen25Vl, Sequence};
use medrl_model::nn::{Exec, Lora};
use medrl_model::tiny::{TinySpec, create_tiny};
use medrl_model::weights::Weights;

type R = Result<(), Box<dyn std::error::Error>>;

fn image(side: usize, seed: f32) -> ProcessedImage {
    let g = side / 14;
    let n = g * g * 1176;
    ProcessedImage { pixel_values: (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect(), grid_thw: [1, g, g] }
}

fn batch_inputs(model: &Qwen25Vl) -> (Vec<Vec<u32>>, Vec<Vec<ProcessedImage>>) {
    let c = &model.config;
    let mut a = vec![5u32, 6, c.vision_start_token_id];
    a.extend(std::iter::repeat_n(c.image_token_id, 4));
    a.extend([c.vision_end_token_id, 7, 8, 9, 10, 11, 12]);
    let b = vec![13u32, 14, 15, 16, 17];
    (vec![a, b], vec![vec![image(56, 0.5)], vec![]])
}

fn trainable(dir: &std::path::Path) -> Result<(Qwen25Vl, Vec<(String, Var)>), Box<dyn std::error::Error>> {
    let config = medrl_model::config::Config::load(dir)?;
    let w = Weights::load(dir, &config, DType::F32, &Device::Cpu)?;
    let vars: Vec<(String, Var)> = w.iter().map(|(k, t)| Ok((k.clone(), Var::from_tensor(t)?))).collect::<Result<_, candle_core::Error>>()?;
    let model = Qwen25Vl::new(config, &Weights::from_tensors(vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone()))), DType::F32, &Device::Cpu)?;
    Ok((model, vars))
}

#[test]
fn checkpointed_gradients_equal_plain_gradients() -> R {
    let dir = tempfile::tempdir()?;
    create_tiny(dir.path(), &TinySpec::default())?;
    let (model, vars) = trainable(dir.path())?;
    let (ids, images) = batch_inputs(&model);
    let seqs: Vec<Sequence<'_>> = ids.iter().zip(&images).map(|(i, im)| Sequence { ids: i, images: im }).collect();
    let batch = model.batch(&seqs, 0)?;
    let spans = vec![10..14, 2..5];
    let weights = Tensor::new(&[1f32, -0.5, 2.0, 0.25, 1.0, -1.0, 0.5], &Device::Cpu)?;
    let mut loss_of = |lp: &Tensor| -> medrl_model::Result<Tensor> { Ok((lp * &weights)?.sum_all()?) };
    let plain_lp = model.span_logprobs(&batch, &spans, Exec::Train)?;
    let plain = loss_of(&plain_lp)?.backward()?;
    let (lp, _, ckpt) = model.checkpointed_backward(&batch, &spans, &mut loss_of)?;
    let d = (lp - plain_lp.detach())?.abs()?.max(0)?.to_scalar::<f32>()?;
    assert!(d < 1e-6, "log-probs differ by {d}");
    for (name, v) in &vars {
        let a = plain.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no plain gradient"));
        let b = ckpt.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no checkpointed gradient"));
        let largest = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(largest > 0.0, "{name}: zero gradient");
        let scale = largest.max(1e-3);
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-4 * scale, "{name}: checkpointed gradient differs by {d} (scale {scale})");
    }
    Ok(())
}

#[test]
fn lora_equals_its_merged_weight_and_only_adapters_learn() -> R {
    let dir = tempfile::tempdir()?;
    create_tiny(dir.path(), &TinySpec::default())?;
    let mut model = Qwen25Vl::load(dir.path(), DType::F32, &Device::Cpu)?;
    let (ids, images) = batch_inputs(&model);
    let seqs: Vec<Sequence<'_>> = ids.iter().zip(&images).map(|(i, im)| Sequence { ids: i, images: im }).collect();
    let batch = model.batch(&seqs, 0)?;
    let mut adapters = Vec::new();
    let mut merged = Weights::load(dir.path(), &model.config, DType::F32, &Device::Cpu)?;
    for (name, lin) in model.linears_mut()? {
        if !name.ends_with("q_proj") && !name.ends_with("down_proj") || name.starts_with("visual") {
            continue;
        }
        let (out, inp) = lin.weight.dims2()?;
        let a = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (4, inp), &Device::Cpu)? * 0.1)?)?;
        let b = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (out, 4), &Device::Cpu)? * 0.1)?)?;
        let lora = Lora { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: 2.0 };
        merged.insert(format!("{name}.weight"), (&lin.weight + lora.delta()?)?);
        lin.lora = Some(lora);
        adapters.push((name, a, b));
    }
    assert!(adapters.len() >= 8, "q_proj and down_proj of every layer");
    let merged_model = Qwen25Vl::new(model.config.clone(), &merged, DType::F32, &Device::Cpu)?;
    let with_lora = model.logits(&model.hidden(&batch, Exec::Train)?)?;
    let with_merged = merged_model.logits(&merged_model.hidden(&batch, Exec::Infer)?)?;
    let d = (&with_lora - with_merged)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(d < 1e-4, "merged logits differ by {d}");
    let grads = with_lora.sum_all()?.backward()?;
    for (name, a, b) in &adapters {
        assert!(grads.get(a.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some(), "{name}: adapter without gradient");
    }
    assert!(grads.get(&model.text.embed_tokens).is_none(), "frozen embedding got a gradient");
    Ok(())
}
