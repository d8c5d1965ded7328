//! The run figures on synthetic series: each writes a PNG that decodes at the figure size with a
//! real drawing in it (many non-white pixels, several colours); empty input is an error, never a
//! panic; `plot_run` draws what a run directory holds and names what it looked for.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::path::Path;

use medrl_eval::run_charts::{DOUBLE_SIZE, SINGLE_SIZE, plot_acc_passk, plot_reward, plot_staleness, plot_support, plot_throughput};
use medrl_eval::run_log::{ModalityRow, PhaseEval, StepPoint, SupportSnapshot};
use medrl_eval::{GroupMetrics, Metrics, plot_run};

fn steps(n: u64) -> Vec<StepPoint> {
    (1..=n)
        .map(|s| StepPoint {
            step: s,
            mean_reward: 0.5 + 0.05 * s as f64,
            mean_accuracy: 0.2 + 0.03 * s as f64,
            tokens: 800.0 + 10.0 * s as f64,
            step_seconds: 2.0,
            time: 1000.0 + 2.5 * s as f64,
            staleness: Some((0.5 * (s % 3) as f64, (s % 3) as f64)),
        })
        .collect()
}

/// Decodes the PNG and checks it is a drawing of `size`: not blank, more than two colours.
fn assert_drawing(path: &Path, size: (u32, u32)) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.len() > 10_000, "{}: only {} bytes", path.display(), bytes.len());
    let img = image::load_from_memory(&bytes).unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display())).to_rgb8();
    assert_eq!(img.dimensions(), size, "{}", path.display());
    let ink = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(ink > 5_000, "{}: only {ink} non-white pixels", path.display());
    let colours: HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 10, "{}: {} colours", path.display(), colours.len());
}

fn group(acc: f64, passes: &[(u64, f64)]) -> GroupMetrics {
    GroupMetrics {
        items: 64,
        samples_per_item: 16,
        acc_at_1: acc,
        pass_at_k: passes.iter().copied().collect(),
        format_failure_rate: 0.0,
        greedy_format_failure_rate: 0.0,
        mean_unique_answers: 2.0,
    }
}

fn metrics(acc: f64, scale: f64) -> Metrics {
    let passes: Vec<(u64, f64)> = [1u64, 2, 4, 8, 16].iter().map(|&k| (k, (scale * (k as f64).log2().max(0.5) / 4.0).min(1.0))).collect();
    Metrics { overall: group(acc, &passes), by_dataset: BTreeMap::new(), by_modality: BTreeMap::new() }
}

#[test]
fn each_figure_is_a_real_png() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let s = steps(12);
    plot_reward(&s, &d.join("reward.png")).expect("reward");
    plot_throughput(&s, &d.join("throughput.png")).expect("throughput");
    plot_staleness(&s, &d.join("staleness.png")).expect("staleness");
    let phases: Vec<PhaseEval> = [("before", 0.0, 0.1), ("sft", 0.2, 0.6), ("after", 0.25, 0.62)]
        .iter()
        .map(|&(phase, acc, pass)| PhaseEval { phase: phase.into(), acc_at_1: acc, pass_at_k: pass, k: 16 })
        .collect();
    let curves = vec![("before".to_string(), metrics(0.0, 0.2)), ("after".to_string(), metrics(0.25, 0.9))];
    plot_acc_passk(&phases, &curves, &d.join("acc_passk.png")).expect("acc_passk");
    plot_acc_passk(&phases, &[], &d.join("acc_only.png")).expect("bars alone");
    let snapshot = SupportSnapshot {
        epoch: 1,
        classes: ["unseen", "zero", "partial", "saturated"].map(String::from).to_vec(),
        modalities: vec![
            ModalityRow { modality: "ct".into(), counts: vec![0, 4, 10, 2], mean_pass_rate: Some(0.45) },
            ModalityRow { modality: "x-ray".into(), counts: vec![1, 0, 6, 9], mean_pass_rate: Some(0.8) },
            ModalityRow { modality: "mri".into(), counts: vec![3, 0, 0, 0], mean_pass_rate: None },
        ],
    };
    plot_support(&snapshot, &d.join("support.png")).expect("support");
    for (name, size) in [
        ("reward.png", SINGLE_SIZE),
        ("throughput.png", SINGLE_SIZE),
        ("staleness.png", SINGLE_SIZE),
        ("acc_passk.png", DOUBLE_SIZE),
        ("acc_only.png", SINGLE_SIZE),
        ("support.png", DOUBLE_SIZE),
    ] {
        assert_drawing(&d.join(name), size);
    }
}

#[test]
fn empty_series_are_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    assert!(plot_reward(&[], &d.join("r.png")).is_err());
    assert!(plot_throughput(&[], &d.join("t.png")).is_err());
    // One step has no wall-time interval, but its step time still gives a point.
    plot_throughput(&steps(1), &d.join("t1.png")).expect("one step");
    let mut no_staleness = steps(3);
    for s in &mut no_staleness {
        s.staleness = None;
    }
    let e = plot_staleness(&no_staleness, &d.join("s.png")).expect_err("no staleness");
    assert!(e.to_string().contains("no points"), "{e}");
    let mut nan = steps(2);
    for s in &mut nan {
        s.mean_reward = f64::NAN;
        s.mean_accuracy = f64::INFINITY;
    }
    assert!(plot_reward(&nan, &d.join("nan.png")).is_err(), "non-finite values are not points");
    assert!(plot_acc_passk(&[], &[], &d.join("a.png")).is_err());
    let empty = SupportSnapshot { epoch: 0, classes: vec!["zero".into()], modalities: vec![] };
    assert!(plot_support(&empty, &d.join("s.png")).is_err());
}

fn step_line(step: u64, reward: f64) -> String {
    serde_json::json!({
        "step": step, "version": step, "loss": 0.1, "grad_norm": 1.0, "mean_reward": reward, "mean_accuracy": reward / 2.0,
        "mean_format": 1.0, "tokens": 500, "groups": 2, "refused": 0, "mean_staleness": 0.0, "max_staleness": 0, "lr": 1e-5,
        "step_seconds": 1.5, "publish_seconds": 0.1, "weight_bytes": 10, "time": 100.0 + 2.0 * step as f64,
    })
    .to_string()
}

#[test]
fn plot_run_draws_what_the_directory_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join("learner")).expect("mkdir");
    // The separate learner role's layout: steps only.
    let text: String = (1..=6).map(|s| step_line(s, 0.1 * s as f64) + "\n").collect();
    std::fs::write(run.join("learner/metrics.jsonl"), text).expect("write");
    let out = dir.path().join("plots");
    let report = plot_run(&run, &out).expect("plots");
    let written: Vec<String> = report.written.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect();
    assert_eq!(written, ["reward.png", "throughput.png", "staleness.png"]);
    for p in &report.written {
        assert_drawing(p, SINGLE_SIZE);
    }
    let skipped: Vec<&str> = report.skipped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(skipped, ["acc_passk.png", "support.png"], "{report:?}");
    assert!(report.skipped[1].1.contains("support.jsonl"), "{report:?}");

    // Nothing recognised: the error names the folder and the files looked for.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let e = plot_run(&empty, &out).expect_err("nothing to plot").to_string();
    assert!(e.contains("empty") && e.contains("rl/metrics.jsonl") && e.contains("support.jsonl") && e.contains("eval/<phase>/metrics.json"), "{e}");
}
