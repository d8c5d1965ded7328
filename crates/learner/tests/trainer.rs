//! The learner over several steps on the tiny model: resuming from a checkpoint gives the same
//! next step as an uninterrupted run, LoRA is merged on save, `no_vision` leaves the vision tower
//! alone, and every trainable tensor receives a gradient.

use candle_core::{DType, Device};
use medrl_learner::batch::{Completion, Group};
use medrl_learner::config::{AlgorithmConfig, AlgorithmName, LearnerConfig, OptimizerKind, Trainable};
use medrl_learner::trainer::Trainer;
use medrl_model::image::ProcessedImage;
use medrl_model::model::{Qwen25Vl, Sequence};
use medrl_model::nn::Exec;
use medrl_model::tiny::{TinySpec, create_tiny};

type R = Result<(), Box<dyn std::error::Error>>;

fn image(seed: u32) -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(56, 56, |x, y| image::Rgb([(x * 5 + seed) as u8, (y * 3 + seed * 7) as u8, ((x + y) * 2) as u8])))
}

const COMPLETIONS: [&str; 4] = [
    "<think>a round shape</think><answer>A</answer><|im_end|>",
    "<think>hmm</think><answer>B</answer><|im_end|>",
    "the answer is A",
    "<think>square corners</think> <answer>A</answer>",
];

fn groups(t: &Trainer, seed: u32) -> Result<Vec<Group>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for (i, answer) in ["A", "B"].iter().enumerate() {
        let images: Vec<ProcessedImage> = vec![t.vlm.images.process_image(&image(seed + i as u32), "test")?];
        let prompt = t.vlm.user_prompt(None, images, "Which shape is shown? A. circle B. square")?;
        let completions = COMPLETIONS
            .iter()
            .map(|c| {
                let ids = t.vlm.prompts.encode_completion(c)?;
                Ok(Completion { text: t.vlm.prompts.decode(&ids, true)?, ids, sampling_logprobs: None })
            })
            .collect::<Result<Vec<_>, medrl_model::Error>>()?;
        out.push(Group { prompt, answer: answer.to_string(), answer_label: None, options: vec![], completions, version: 0 });
    }
    Ok(out)
}

fn configs(trainable: Trainable, kind: OptimizerKind, lr: f64) -> (AlgorithmConfig, LearnerConfig) {
    let mut algorithm = AlgorithmConfig { name: AlgorithmName::GrpoCare, ..Default::default() };
    algorithm.ema.every = 1;
    algorithm.ema.decay = 0.5;
    let mut learner = LearnerConfig { trainable, micro_batch_sequences: 3, total_steps: 10, ..Default::default() };
    learner.optimizer.kind = kind;
    learner.optimizer.lr = lr;
    learner.lora.rank = 4;
    (algorithm, learner)
}

fn max_weight_diff(a: &Trainer, b: &Trainer) -> Result<f32, Box<dyn std::error::Error>> {
    let (wa, wb) = (a.policy.merged_weights()?, b.policy.merged_weights()?);
    let mut worst = 0f32;
    for (name, t) in wa.iter() {
        worst = worst.max((t - wb.get(name)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    }
    Ok(worst)
}

#[test]
fn resume_equals_an_uninterrupted_run() -> R {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny");
    create_tiny(&model, &TinySpec::default())?;
    for trainable in [Trainable::All, Trainable::Lora] {
        let (algorithm, learner) = configs(trainable, OptimizerKind::Adamw, 1e-3);
        let mut straight = Trainer::new(&model, algorithm.clone(), learner.clone(), DType::F32, &Device::Cpu)?;
        let mut first = Trainer::new(&model, algorithm.clone(), learner.clone(), DType::F32, &Device::Cpu)?;
        let batches: Vec<Vec<Group>> = (0..3).map(|s| groups(&straight, s * 10)).collect::<Result<_, _>>()?;
        for b in &batches {
            straight.step(b)?;
        }
        for b in &batches[..2] {
            first.step(b)?;
        }
        let run = dir.path().join(format!("run-{trainable:?}"));
        let checkpoint = first.save_checkpoint(&run, &model)?;
        assert_eq!(medrl_learner::checkpoint::latest_checkpoint(&run), Some(checkpoint.clone()));
        let mut resumed = Trainer::resume(&checkpoint, algorithm, learner, DType::F32, &Device::Cpu)?;
        assert_eq!(resumed.step, 2);
        let a = straight.policy.merged_weights()?;
        let report = resumed.step(&batches[2])?;
        assert_eq!(report.step, 3);
        let d = max_weight_diff(&straight, &resumed)?;
        assert!(d < 1e-6, "{trainable:?}: resumed run differs from the uninterrupted one by {d}");
        // The step changed something, so equality above is not vacuous.
        let before = first.policy.merged_weights()?;
        let moved = a.iter().map(|(n, t)| (t - before.get(n).expect("same names")).and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()).unwrap_or(0.0)).fold(0f32, f32::max);
        assert!(moved > 1e-5, "{trainable:?}: the third step did not move the weights");
    }
    Ok(())
}

#[test]
fn lora_is_merged_on_save_and_no_vision_keeps_the_tower() -> R {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny");
    create_tiny(&model, &TinySpec::default())?;
    let (algorithm, learner) = configs(Trainable::Lora, OptimizerKind::Sgd, 0.5);
    let mut t = Trainer::new(&model, AlgorithmConfig { name: AlgorithmName::Sft, ..algorithm.clone() }, learner, DType::F32, &Device::Cpu)?;
    let batch = groups(&t, 1)?;
    t.step(&batch)?;
    t.step(&batch)?;
    let saved = dir.path().join("merged");
    t.save_model(&saved)?;
    let merged = Qwen25Vl::load(&saved, DType::F32, &Device::Cpu)?;
    let g = &batch[0];
    let ids = [g.prompt.ids.as_slice(), g.completions[0].ids.as_slice()].concat();
    let seq = [Sequence { ids: &ids, images: &g.prompt.images }];
    let with_adapters = t.vlm.model.logits(&t.vlm.model.hidden(&t.vlm.model.batch(&seq, 0)?, Exec::Infer)?)?;
    let from_disk = merged.logits(&merged.hidden(&merged.batch(&seq, 0)?, Exec::Infer)?)?;
    let d = (with_adapters - from_disk)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(d < 1e-4, "merged checkpoint differs from the adapted model by {d}");
    let base = Qwen25Vl::load(&model, DType::F32, &Device::Cpu)?;
    let untouched = base.logits(&base.hidden(&base.batch(&seq, 0)?, Exec::Infer)?)?;
    let moved = (untouched - merged.logits(&merged.hidden(&merged.batch(&seq, 0)?, Exec::Infer)?)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(moved > 1e-4, "LoRA training changed nothing");

    let (algorithm, learner) = configs(Trainable::NoVision, OptimizerKind::Sgd, 0.5);
    let mut t = Trainer::new(&model, algorithm, learner, DType::F32, &Device::Cpu)?;
    let before = t.policy.merged_weights()?;
    assert!(t.policy.params.iter().all(|(n, _)| !n.starts_with("visual.")));
    t.step(&groups(&t, 2)?)?;
    let after = t.policy.merged_weights()?;
    for (name, w) in before.iter() {
        let d = (w - after.get(name)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        if name.starts_with("visual.") {
            assert_eq!(d, 0.0, "{name} changed although the vision tower is frozen");
        }
    }
    Ok(())
}
