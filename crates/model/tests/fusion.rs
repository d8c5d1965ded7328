//! Fused q/k/v and gate/up projections compute what the separate ones do, teacher-forced and while
//! generating, and fusion is refused where it would lose an adapter or a gradient.

use candle_core::{DType, Device, Tensor, Var};
use medrl_model::Error;
use medrl_model::generate::{GenerationParams, Sampling};
use medrl_model::model::{Qwen25Vl, Sequence};
use medrl_model::nn::{Exec, Lora};
use medrl_model::pipeline::{EncodedPrompt, Vlm};
use medrl_model::tiny::{TinySpec, create_tiny};
use medrl_model::weights::Weights;

type R = Result<(), Box<dyn std::error::Error>>;

fn image(side: u32, seed: u32) -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x * 7 + seed) as u8, (y * 5 + 3 * seed) as u8, ((x ^ y) * 3) as u8])))
}

fn prompts(vlm: &Vlm) -> Result<Vec<EncodedPrompt>, Box<dyn std::error::Error>> {
    let a = vlm.images.process_image(&image(56, 1), "a")?;
    Ok(vec![vlm.user_prompt(None, vec![a], "What colour is the square?")?, vlm.user_prompt(Some("You are a radiologist."), vec![], "Is there a mass?")?])
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32, candle_core::Error> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[test]
fn fused_projections_give_the_unfused_logits_and_samples() -> R {
    let dir = tempfile::tempdir()?;
    let config = create_tiny(dir.path(), &TinySpec { seed: 9, ..TinySpec::default() })?;
    let mut weights = Weights::load(dir.path(), &config, DType::F32, &Device::Cpu)?;
    // The tiny model's biases are zero; distinct random ones make every part's bias count.
    let biases: Vec<String> = weights.iter().map(|(k, _)| k.clone()).filter(|k| k.starts_with("model.layers.") && k.ends_with(".bias")).collect();
    assert!(!biases.is_empty(), "the decoder has q/k/v biases");
    for name in biases {
        let shape = weights.get(&name)?.shape().clone();
        weights.insert(name, Tensor::randn(0f32, 0.5, shape, &Device::Cpu)?);
    }
    let build = || -> Result<Vlm, Error> { Vlm::from_parts(dir.path(), Qwen25Vl::new(config.clone(), &weights, DType::F32, &Device::Cpu)?) };
    let plain = build()?;
    let mut fused = build()?;
    fused.model.fuse_projections()?;
    fused.model.fuse_projections()?;

    let ps = prompts(&plain)?;
    // Teacher-forced over a left-padded batch with an image, in both execution paths.
    let seqs: Vec<Sequence<'_>> = ps.iter().map(|p| Sequence { ids: &p.ids, images: &p.images }).collect();
    let batch = plain.model.batch(&seqs, plain.pad_id)?;
    for exec in [Exec::Infer, Exec::Train] {
        let want = plain.model.logits(&plain.model.hidden(&batch, exec)?)?;
        let got = fused.model.logits(&fused.model.hidden(&batch, exec)?)?;
        let d = max_diff(&want, &got)?;
        assert!(d < 1e-5, "{exec:?}: fused logits differ by {d}");
    }

    // Prefill and decode steps: same tokens, log-probs within float noise.
    let random = Sampling::Random { temperature: 1.0, top_p: 1.0, top_k: 0 };
    for sampling in [Sampling::Greedy, random] {
        let params = GenerationParams { sampling, max_new_tokens: 12, seed: 21 };
        let want = plain.generate(&ps, 3, &params)?;
        let got = fused.generate(&ps, 3, &params)?;
        for (wg, gg) in want.iter().zip(&got) {
            assert_eq!(wg.len(), gg.len());
            for (w, g) in wg.iter().zip(gg) {
                assert_eq!(w.completion.token_ids, g.completion.token_ids, "{sampling:?}");
                assert_eq!(w.completion.stopped, g.completion.stopped);
                for (a, b) in w.completion.logprobs.iter().zip(&g.completion.logprobs) {
                    assert!((a - b).abs() < 1e-5, "{sampling:?}: log-prob {a} vs fused {b}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fusion_is_refused_for_adapted_or_trainable_projections() -> R {
    let dir = tempfile::tempdir()?;
    create_tiny(dir.path(), &TinySpec::default())?;
    let config = medrl_model::config::Config::load(dir.path())?;
    let weights = Weights::load(dir.path(), &config, DType::F32, &Device::Cpu)?;

    let mut adapted = Qwen25Vl::new(config.clone(), &weights, DType::F32, &Device::Cpu)?;
    for (name, lin) in adapted.linears_mut()? {
        if name == "model.layers.1.self_attn.v_proj" {
            let (out, inp) = lin.weight.dims2()?;
            lin.lora = Some(Lora { a: Tensor::ones((2, inp), DType::F32, &Device::Cpu)?, b: Tensor::ones((out, 2), DType::F32, &Device::Cpu)?, scale: 1.0 });
        }
    }
    match adapted.fuse_projections() {
        Err(Error::Fusion { module, problem }) => {
            assert_eq!(module, "model.layers.1.self_attn.v_proj");
            assert!(problem.contains("LoRA"), "{problem}");
        }
        other => panic!("fusing a LoRA-adapted projection gave {other:?}"),
    }
    // Refused before anything changed: layer 0, checked first, was not fused either.
    assert_eq!(adapted.linears_mut()?.iter().filter(|(n, _)| n.starts_with("model.")).count(), 7 * config.text.num_hidden_layers);

    let mut trainable = weights.clone();
    let name = "model.layers.0.mlp.up_proj.weight";
    trainable.insert(name, Var::from_tensor(weights.get(name)?)?.as_tensor().clone());
    let mut model = Qwen25Vl::new(config.clone(), &trainable, DType::F32, &Device::Cpu)?;
    assert!(matches!(model.fuse_projections(), Err(Error::Fusion { module, .. }) if module == "model.layers.0.mlp.up_proj"));

    // A fused model has no per-module layers to hand out for adapters.
    let mut frozen = Qwen25Vl::new(config, &weights, DType::F32, &Device::Cpu)?;
    frozen.fuse_projections()?;
    assert!(matches!(frozen.linears_mut(), Err(Error::Fusion { .. })));
    Ok(())
}
