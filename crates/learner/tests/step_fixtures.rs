//! One learner step equals the PyTorch reference of the released formulas
//! (`tools/parity/make_learner_fixtures.py`) on recorded batches: rewards, advantages and CARE
//! bonus exactly; loss, gradient norm and the updated weights within f32 tolerance; for GRPO,
//! GRPO-CARE, off-policy clipping and SFT, with SGD and AdamW.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medrl_learner::batch::read_groups;
use medrl_learner::config::{AlgorithmConfig, LearnerConfig};
use medrl_learner::trainer::Trainer;
use medrl_model::config::Config;
use medrl_model::weights::Weights;
use serde::Deserialize;

type R = Result<(), Box<dyn std::error::Error>>;

#[derive(Deserialize)]
struct RunYaml {
    algorithm: AlgorithmConfig,
    learner: LearnerConfig,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/step")
}

fn close(a: f64, b: f64, abs: f64, rel: f64) -> bool {
    (a - b).abs() <= abs.max(rel * b.abs())
}

fn run_case(name: &str) -> R {
    let dir = fixtures().join(name);
    let case: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("case.json"))?)?;
    let model_dir = dir.join(case["model"].as_str().ok_or("case.json: model")?);
    let run: RunYaml = yaml_serde::from_str(&std::fs::read_to_string(dir.join("run.yaml"))?)?;
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let mut trainer = Trainer::new(&model_dir, run.algorithm.clone(), run.learner.clone(), DType::F32, &Device::Cpu)?;
    let groups = read_groups(&dir.join("groups.jsonl"), &trainer.vlm, None)?;
    let report = trainer.step(&groups)?;

    for (field, got) in [("rewards", &report.rewards), ("advantages", &report.advantages), ("bonus", &report.bonus)] {
        let want: Vec<Vec<f64>> = serde_json::from_value(expected[field].clone())?;
        assert_eq!(got.len(), want.len(), "{name}: {field} groups");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.len(), w.len(), "{name}: {field}");
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() < 1e-9, "{name}: {field} {a} vs {b}");
            }
        }
    }
    assert_eq!(report.tokens as u64, expected["tokens"].as_u64().ok_or("tokens")?, "{name}: tokens");
    let want_loss = expected["loss"].as_f64().ok_or("loss")?;
    assert!(close(report.loss, want_loss, 1e-6, 1e-5), "{name}: loss {} vs {want_loss}", report.loss);
    let want_norm = expected["grad_norm"].as_f64().ok_or("grad_norm")?;
    assert!(close(report.grad_norm, want_norm, 1e-7, 1e-5), "{name}: grad norm {} vs {want_norm}", report.grad_norm);

    let config = Config::load(&model_dir)?;
    let before = Weights::load(&model_dir, &config, DType::F32, &Device::Cpu)?;
    let after = trainer.policy.merged_weights()?;
    let stored: HashMap<String, Tensor> = candle_core::safetensors::load(dir.join("expected_weights.safetensors"), &Device::Cpu)?;
    assert!(!stored.is_empty());
    for (key, want) in &stored {
        let got = after.get(&medrl_model::weights::legacy_name(key))?;
        let d = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{name}: weight {key} differs by {d}");
    }
    let update_l2 = expected["debug"]["update_l2"].as_object().ok_or("update_l2")?;
    for (key, want) in update_l2 {
        let want = want.as_f64().ok_or("l2")?;
        let name_ = medrl_model::weights::legacy_name(key);
        let got = (after.get(&name_)? - before.get(&name_)?)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
        assert!(close(got, want, 1e-6, 1e-4), "{name}: update of {key} has norm {got}, expected {want}");
    }
    Ok(())
}

#[test]
fn grpo_sgd() -> R {
    run_case("grpo_sgd")
}

#[test]
fn grpo_care_sgd() -> R {
    run_case("grpo_care_sgd")
}

#[test]
fn grpo_care_adamw() -> R {
    run_case("grpo_care_adamw")
}

#[test]
fn grpo_offpolicy_sgd() -> R {
    run_case("grpo_offpolicy_sgd")
}

#[test]
fn sft_sgd() -> R {
    run_case("sft_sgd")
}

#[test]
fn sft_adamw() -> R {
    run_case("sft_adamw")
}
