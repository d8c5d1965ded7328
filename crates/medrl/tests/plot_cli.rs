//! `medrl plot` as a real process on run directories written in the real formats: the learner's
//! `StepSummary` lines, `medrl train`'s eval events, `write_outputs`' `metrics.json` and the
//! coordinator's `support.jsonl`; every figure decodes; missing inputs are skipped with a reason;
//! bad lines and empty directories are errors naming the file, line and field.

use std::path::Path;
use std::process::{Command, Output};

use medrl_eval::{ItemSamples, Judged, write_outputs};
use medrl_learner::service::StepSummary;

fn medrl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medrl")).args(args).output().expect("medrl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn step(step: u64, reward: f64, stale: u64) -> String {
    let summary = StepSummary {
        step,
        version: step,
        loss: 0.3,
        grad_norm: 1.2,
        mean_reward: reward,
        mean_accuracy: reward / 2.0,
        mean_format: 1.0,
        tokens: 900 + step as usize,
        groups: 4,
        refused: 0,
        mean_staleness: stale as f64 / 2.0,
        max_staleness: stale,
        lr: 1e-5,
        step_seconds: 2.0,
        publish_seconds: 0.2,
        weight_bytes: 1000,
        time: 1_700_000_000.0 + 3.0 * step as f64,
    };
    serde_json::to_string(&summary).expect("serialise") + "\n"
}

/// `medrl train`'s `append_metrics` line for one evaluation.
fn eval_event(phase: &str, acc: f64, pass: f64) -> String {
    serde_json::json!({"event": "eval", "phase": phase, "acc_at_1": acc, "pass_at_k": pass, "k": 8, "format_failure_rate": 0.0, "time": 1.0}).to_string() + "\n"
}

/// A phase's evaluation outputs, written by the real writer from `correct[i]` of 8 samples.
fn eval_outputs(dir: &Path, correct: &[usize]) {
    let j = |c: bool| Judged { text: String::new(), prediction: "A".into(), correct: c, format_ok: true };
    let items: Vec<ItemSamples> = correct
        .iter()
        .enumerate()
        .map(|(i, &c)| ItemSamples {
            id: i.to_string(),
            dataset: "synthetic".into(),
            modality: format!("m{}", i % 2),
            answer_label: None,
            answer: "a".into(),
            greedy: j(c > 4),
            samples: (0..8).map(|k| j(k < c)).collect(),
        })
        .collect();
    std::fs::create_dir_all(dir).expect("mkdir");
    write_outputs(&items, dir, &Default::default()).expect("eval outputs");
}

fn assert_png(path: &Path) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display())).to_rgb8();
    assert!(img.width() >= 800 && img.height() >= 500, "{}: {:?}", path.display(), img.dimensions());
    let ink = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(ink > 5_000, "{}: only {ink} non-white pixels", path.display());
}

#[test]
fn plots_a_train_run_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    std::fs::create_dir_all(run.join("rl")).expect("mkdir");
    // Steps 1-5, then a learner restart from step 3's checkpoint logs 4 and 5 again.
    let steps: String = (1..=5).map(|i| step(i, 0.2 * i as f64, i % 2)).chain((4..=5).map(|i| step(i, 0.25 * i as f64, 0))).collect();
    std::fs::write(run.join("rl/metrics.jsonl"), steps).expect("steps");
    let events = [eval_event("before", 0.0, 0.1), r#"{"event":"sft_step","step":1,"loss":2.5,"time":1.0}"#.to_string() + "\n", eval_event("sft", 0.2, 0.6), eval_event("after", 0.3, 0.65)];
    std::fs::write(run.join("metrics.jsonl"), events.concat()).expect("events");
    eval_outputs(&run.join("eval/before"), &[0, 1, 0, 2]);
    eval_outputs(&run.join("eval/after"), &[5, 8, 3, 6]);
    let support = serde_json::json!({
        "epoch": 0, "time": 1.0, "done": true, "classes": ["unseen", "zero", "partial", "saturated"],
        "modalities": [{"modality": "ct", "counts": [0, 2, 5, 1], "mean_pass_rate": 0.4}, {"modality": "mri", "counts": [1, 0, 3, 4], "mean_pass_rate": 0.7}],
    });
    std::fs::write(run.join("rl/support.jsonl"), format!("{support}\n")).expect("support");

    let o = medrl(&["plot", s(&run)]);
    assert!(o.status.success(), "medrl plot failed: {}", text(&o.stderr));
    let stdout = text(&o.stdout);
    for name in ["reward.png", "acc_passk.png", "throughput.png", "staleness.png", "support.png"] {
        let path = run.join("plots").join(name);
        assert!(stdout.contains(&format!("wrote {}", path.display())), "{name} not reported: {stdout}");
        assert_png(&path);
    }
    assert!(!stdout.contains("skipped"), "{stdout}");

    // The separate roles' layout, into --out: the learner's steps alone; the rest is skipped.
    let roles = tmp.path().join("roles");
    std::fs::create_dir_all(roles.join("learner")).expect("mkdir");
    std::fs::write(roles.join("learner/metrics.jsonl"), (1..=3).map(|i| step(i, 0.1, 0)).collect::<String>()).expect("steps");
    let out = tmp.path().join("figures");
    let o = medrl(&["plot", s(&roles), "--out", s(&out)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert_png(&out.join("reward.png"));
    assert!(stdout.contains("skipped acc_passk.png:") && stdout.contains("skipped support.png:"), "{stdout}");
    assert!(!out.join("support.png").exists() && !roles.join("plots").exists());
}

#[test]
fn bad_lines_and_empty_directories_are_clean_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    std::fs::create_dir_all(run.join("rl")).expect("mkdir");
    let bad = step(2, 0.5, 0).replace("\"mean_reward\":0.5", "\"mean_reward\":\"high\"");
    assert!(bad.contains("\"high\""), "the replacement must hit: {bad}");
    std::fs::write(run.join("rl/metrics.jsonl"), [step(1, 0.1, 0), bad].concat()).expect("steps");
    let o = medrl(&["plot", s(&run)]);
    assert!(!o.status.success(), "a bad line must fail");
    let err = text(&o.stderr);
    assert!(err.contains("rl/metrics.jsonl:2") && err.contains("mean_reward") && !err.contains("panicked"), "{err}");

    let missing = step(1, 0.1, 0).replace("\"tokens\":901,", "");
    std::fs::write(run.join("rl/metrics.jsonl"), missing).expect("steps");
    let err = text(&medrl(&["plot", s(&run)]).stderr);
    assert!(err.contains("rl/metrics.jsonl:1") && err.contains("missing field `tokens`"), "{err}");

    let empty = tmp.path().join("empty-run");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let o = medrl(&["plot", s(&empty)]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("empty-run") && err.contains("rl/metrics.jsonl") && err.contains("learner/metrics.jsonl") && err.contains("support.jsonl"), "{err}");
}
