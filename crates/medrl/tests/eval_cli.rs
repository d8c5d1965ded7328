//! `medrl eval --samples` as a real process on a samples file written here: every output file,
//! Pass@k equal to the unbiased estimator computed independently (exact binomials) to 1e-9,
//! re-judging with `--data`, and clean errors for bad input.

use std::path::Path;
use std::process::{Command, Output};

fn medrl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medrl")).args(args).output().expect("medrl runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// C(n, k) exactly.
fn choose(n: u64, k: u64) -> u128 {
    if k > n {
        return 0;
    }
    (0..u128::from(k)).fold(1u128, |acc, i| acc * (u128::from(n) - i) / (i + 1))
}

/// One samples line: `correct` of `n` samples right (letters A right, B wrong), greedy as given.
fn line(id: &str, dataset: &str, modality: &str, greedy: bool, correct: usize, n: usize) -> String {
    let sample = |ok: bool| {
        let letter = if ok { "A" } else { "B" };
        serde_json::json!({"text": format!("<think>.</think><answer>{letter}</answer>"), "prediction": letter, "correct": ok, "format_ok": true})
    };
    let samples: Vec<serde_json::Value> = (0..n).map(|i| sample(i < correct)).collect();
    serde_json::json!({
        "id": id, "dataset": dataset, "modality": modality, "answer_label": "A", "answer": "yes",
        "greedy": sample(greedy), "samples": samples,
    })
    .to_string()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

#[test]
fn eval_from_samples_reproduces_the_estimator() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // (dataset, modality, greedy, correct) for n = 16.
    let spec = [("pmc", "ct", true, 16), ("pmc", "ct", false, 3), ("pmc", "mri", false, 0), ("slake", "mri", true, 9), ("slake", "xray", false, 1), ("slake", "xray", true, 15), ("rad", "xray", false, 7)];
    let text: String = spec.iter().enumerate().map(|(i, (d, m, g, c))| line(&format!("q{i}"), d, m, *g, *c, 16) + "\n").collect();
    // A kill left half a line at the end: it is ignored.
    let partial = line("q-partial", "pmc", "ct", true, 2, 16);
    let samples = tmp.path().join("samples.jsonl");
    write(&samples, &format!("{text}{}", &partial[..partial.len() / 3]));
    let out = tmp.path().join("out");
    let o = medrl(&["eval", "--samples", samples.to_str().expect("utf-8"), "--out", out.to_str().expect("utf-8")]);
    assert!(o.status.success(), "eval --samples failed: {}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("7 items"), "{}", String::from_utf8_lossy(&o.stdout));
    for f in ["metrics.json", "metrics.md", "support_gap.md", "passk.png", "passk.svg"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).expect("read")).expect("json");
    let expect = |members: &[usize], k: u64| -> f64 {
        members.iter().map(|&i| 1.0 - choose(16 - spec[i].3 as u64, k) as f64 / choose(16, k) as f64).sum::<f64>() / members.len() as f64
    };
    for k in [1u64, 2, 4, 8, 16] {
        let overall = metrics["overall"]["pass_at_k"][k.to_string()].as_f64().expect("overall pass@k");
        assert!((overall - expect(&[0, 1, 2, 3, 4, 5, 6], k)).abs() < 1e-9, "overall pass@{k}");
        let slake = metrics["by_dataset"]["slake"]["pass_at_k"][k.to_string()].as_f64().expect("slake pass@k");
        assert!((slake - expect(&[3, 4, 5], k)).abs() < 1e-9, "slake pass@{k}");
        let xray = metrics["by_modality"]["xray"]["pass_at_k"][k.to_string()].as_f64().expect("xray pass@k");
        assert!((xray - expect(&[4, 5, 6], k)).abs() < 1e-9, "xray pass@{k}");
    }
    assert_eq!(metrics["overall"]["acc_at_1"].as_f64(), Some(3.0 / 7.0));
    let report = std::fs::read_to_string(out.join("support_gap.md")).expect("report");
    assert!(report.contains("| dataset | pmc |") && report.contains("paper-recipe.md §9"), "{report}");

    // Re-judging against records: the records say the answer is B, so every judgement flips.
    let records: String = (0..spec.len())
        .map(|i| serde_json::json!({"id": format!("q{i}"), "dataset": "x", "question": "Q?", "options": ["yes", "no"], "answer_label": "B", "answer": "no"}).to_string() + "\n")
        .collect();
    let data = tmp.path().join("data.jsonl");
    write(&data, &records);
    let out2 = tmp.path().join("rejudged");
    let o = medrl(&["eval", "--samples", samples.to_str().expect("utf-8"), "--data", data.to_str().expect("utf-8"), "--out", out2.to_str().expect("utf-8")]);
    assert!(o.status.success(), "rejudge failed: {}", stderr(&o));
    let m2: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out2.join("metrics.json")).expect("read")).expect("json");
    assert_eq!(m2["overall"]["acc_at_1"].as_f64(), Some(4.0 / 7.0));
    assert!(out2.join("samples.rejudged.jsonl").is_file());
}

#[test]
fn eval_reports_bad_input_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("bad.jsonl");
    write(&bad, "{\"id\": \"x\"}\n{}\n");
    let o = medrl(&["eval", "--samples", bad.to_str().expect("utf-8")]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("bad.jsonl:1") && !err.contains("panicked"), "{err}");
    let o = medrl(&["eval"]);
    assert!(!o.status.success(), "no input must fail");
    let o = medrl(&["eval", "--samples", "/nonexistent/samples.jsonl"]);
    assert!(stderr(&o).contains("/nonexistent/samples.jsonl"), "{}", stderr(&o));
}
