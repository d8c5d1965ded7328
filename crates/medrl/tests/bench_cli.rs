//! `medrl bench` as a real process on the tiny model: the parity check passes in f32 and bf16 with
//! differences of the size each dtype gives and fails past its tolerance; rollout prints one line
//! per batch size of a list; the learner runs forward + backward without an optimizer; the weight
//! stream carries a model's blob or random bytes, timing each side; the 7B config the GPU
//! benchmarks use has Qwen2.5-VL-7B's parameter count.

use std::process::{Command, Output};

use medrl_model::config::Config;
use serde_json::Value;

fn medrl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medrl")).args(args).output().expect("medrl runs")
}

fn json_lines(out: &Output) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}\nstdout {stdout}\nstderr {}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

fn number(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn parity_passes_per_dtype_with_differences_of_that_dtype() {
    for (dtype, lo, hi) in [("f32", 0.0, 1e-5), ("bf16", 1e-4, 0.05)] {
        let report = &json_lines(&medrl(&["bench", "parity", "--dtype", dtype]))[0];
        assert_eq!(report["pass"], true, "{report}");
        // 16 tokens each: two sampled completions and a greedy one.
        assert_eq!((number(report, "scored_tokens"), number(report, "decoded_tokens")), (32.0, 48.0), "{report}");
        for key in ["infer_max_abs_diff", "infer_fused_max_abs_diff", "decode_max_abs_diff"] {
            let d = number(report, key);
            assert!(d <= hi, "{dtype} {key} {d} > {hi}: {report}");
            // bf16 rounding must show: a check that compared f32 with f32 would read zero here.
            assert!(dtype == "f32" || d >= lo, "{dtype} {key} {d} < {lo}: {report}");
        }
    }
}

#[test]
fn parity_fails_past_its_tolerance() {
    let out = medrl(&["bench", "parity", "--dtype", "bf16", "--tolerance", "0"]);
    assert!(!out.status.success(), "bf16 cannot match f32 exactly");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"pass\":false"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("differ from the CPU f32 reference"));
}

#[test]
fn rollout_runs_each_batch_size_of_a_list() {
    let out = medrl(&["bench", "rollout", "--prompts", "1,3", "--samples", "2", "--new-tokens", "5", "--image-size", "56", "--prompt-tokens", "6"]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, prompts) in lines.iter().zip([1.0, 3.0]) {
        assert_eq!(number(line, "prompts"), prompts);
        assert_eq!(line["decode_attention"], "candle-ops", "no fused kernel on the CPU: {line}");
        assert!(number(line, "rollout_tok_per_s") > 0.0 && number(line, "decode_step_ms") > 0.0, "{line}");
    }
}

#[test]
fn learner_without_optimizer_and_bad_arguments() {
    let report = &json_lines(&medrl(&["bench", "learner", "--optimizer", "none", "--sequences", "2", "--completion-tokens", "4", "--image-size", "56", "--prompt-tokens", "4"]))[0];
    assert_eq!(report["optimizer"], "none");
    assert!(number(report, "fwd_bwd_tok_per_s") > 0.0, "{report}");
    for (args, expected) in [
        (&["bench", "learner", "--optimizer", "sgdx"][..], "expected adamw or none"),
        (&["bench", "rollout", "--layers", "0"][..], "--layers 0"),
        (&["bench", "parity", "--image-size", "30"][..], "multiple of 28"),
    ] {
        let out = medrl(args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn weight_sync_streams_a_model_blob_or_random_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = medrl_model::tiny::create_tiny(dir.path(), &medrl_model::tiny::TinySpec::default()).expect("tiny model");
    let params: f64 = medrl_model::weights::expected_shapes(&config).iter().map(|(_, s)| s.iter().product::<usize>() as f64).sum();
    let path = dir.path().join("config.json");
    let report = &json_lines(&medrl(&["bench", "weight-sync", "--config", path.to_str().expect("utf-8 path"), "--dtype", "bf16"]))[0];
    assert_eq!((report["blob"].as_str(), report["dtype"].as_str()), (Some("model"), Some("bf16")), "{report}");
    // Two bytes a parameter plus the safetensors header.
    let header = number(report, "bytes") - 2.0 * params;
    assert!((8.0..64.0 * 1024.0).contains(&header), "{header} header bytes: {report}");
    for key in ["encode_s", "warm_encode_s", "publish_s", "decode_s"] {
        assert!(number(report, key) > 0.0, "{key}: {report}");
    }
    for fetch in ["cold", "warm"] {
        assert!(number(&report[fetch], "gb_per_s") > 0.0, "{fetch}: {report}");
    }
    let random = &json_lines(&medrl(&["bench", "weight-sync", "--mib", "2"]))[0];
    assert_eq!((random["blob"].as_str(), number(random, "bytes")), (Some("random"), 2.0 * 1024.0 * 1024.0), "{random}");
    assert!(random["encode_s"].is_null() && random["warm_encode_s"].is_null() && random["decode_s"].is_null(), "{random}");
}

#[test]
fn the_7b_config_is_qwen2_5_vl_7b() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/models/qwen2.5-vl-7b.json");
    let text = std::fs::read_to_string(path).expect("the 7B config is committed");
    let config = Config::from_json_str(&text, std::path::Path::new(path)).expect("it parses");
    let params: usize = medrl_model::weights::expected_shapes(&config).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    // shared/reference/qwen2_5_vl.md: about 8.29 B (text 7.6 B, vision 0.68 B).
    assert!((8.28e9..8.30e9).contains(&(params as f64)), "{params}");
    assert_eq!((config.text.num_hidden_layers, config.text.num_key_value_heads, config.vision.depth), (28, 4, 32));
}
