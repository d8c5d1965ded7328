//! The model commands run as real processes: the happy path of `tiny-model`, `generate` and
//! `score`, and a clear error (never a panic) for each kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn medrl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medrl")).args(args).output().expect("medrl runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tiny(dir: &Path) -> PathBuf {
    let model = dir.join("tiny");
    let out = medrl(&["tiny-model", "--out", model.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "tiny-model failed: {}", stderr(&out));
    model
}

fn write_png(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 128]));
    img.save(path).expect("png written");
}

/// Fails unless the command failed cleanly with every `needles` in its message.
fn assert_clean_error(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected a failure, got success");
    assert!(!err.contains("panicked"), "panicked instead of an error: {err}");
    for n in needles {
        assert!(err.contains(n), "error does not mention {n:?}: {err}");
    }
}

#[test]
fn generate_and_score_run_on_the_tiny_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tiny(tmp.path());
    let img = tmp.path().join("scan.png");
    write_png(&img, 84, 56);
    let m = model.to_str().expect("utf-8");
    let out = medrl(&["generate", "--model", m, "--image", img.to_str().expect("utf-8"), "--prompt", "What shape is shown?", "--greedy", "--num-samples", "2", "--max-new-tokens", "6", "--json"]);
    assert!(out.status.success(), "generate failed: {}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 2, "one line per sample");
    for l in &lines {
        let ids = l["token_ids"].as_array().expect("token_ids");
        assert!(!ids.is_empty() && ids.len() <= 6);
        assert_eq!(l["logprobs"].as_array().expect("logprobs").len(), ids.len());
        assert!(l["logprobs"].as_array().expect("logprobs").iter().all(|v| v.as_f64().is_some_and(|x| x <= 0.0)));
        assert!(l["text"].is_string());
    }
    assert_eq!(lines[0]["token_ids"], lines[1]["token_ids"], "greedy samples agree");

    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"images\": [\"scan.png\"], \"prompt\": \"What shape?\", \"completion\": \"<think>round</think><answer>A</answer>\", \"id\": 7}\n{\"images\": [], \"prompt\": \"Hi\", \"completion\": \"hello\"}\n").expect("write");
    let output = tmp.path().join("out.jsonl");
    let out = medrl(&["score", "--model", m, "--input", input.to_str().expect("utf-8"), "--output", output.to_str().expect("utf-8")]);
    assert!(out.status.success(), "score failed: {}", stderr(&out));
    let text = std::fs::read_to_string(&output).expect("output");
    let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], 7, "input fields are kept");
    let n = rows[0]["completion_token_ids"].as_array().expect("ids").len();
    assert!(n > 0);
    assert_eq!(rows[0]["token_logprobs"].as_array().expect("lps").len(), n);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tiny(tmp.path());
    let m = model.to_str().expect("utf-8");

    let missing = tmp.path().join("nowhere");
    assert_clean_error(&medrl(&["generate", "--model", missing.to_str().expect("utf-8"), "--prompt", "x"]), &["nowhere"]);

    let not_image = tmp.path().join("fake.png");
    std::fs::write(&not_image, b"this is not a png").expect("write");
    assert_clean_error(&medrl(&["generate", "--model", m, "--image", not_image.to_str().expect("utf-8"), "--prompt", "x"]), &["fake.png"]);

    let absent_image = tmp.path().join("absent.png");
    assert_clean_error(&medrl(&["generate", "--model", m, "--image", absent_image.to_str().expect("utf-8"), "--prompt", "x"]), &["absent.png"]);

    // A config field of the wrong type names the file and the field.
    let bad = tmp.path().join("bad");
    copy_dir(&model, &bad);
    let cfg_path = bad.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("config")).expect("json");
    cfg["text_config"]["num_attention_heads"] = serde_json::json!("four");
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    assert_clean_error(&medrl(&["generate", "--model", bad.to_str().expect("utf-8"), "--prompt", "x"]), &["config.json", "num_attention_heads"]);

    // A prompt longer than the context.
    let short = tmp.path().join("short");
    copy_dir(&model, &short);
    let cfg_path = short.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("config")).expect("json");
    cfg["text_config"]["max_position_embeddings"] = serde_json::json!(24);
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let long_prompt = "describe the image in detail please ".repeat(10);
    assert_clean_error(&medrl(&["generate", "--model", short.to_str().expect("utf-8"), "--prompt", &long_prompt, "--max-new-tokens", "4"]), &["context"]);

    // A truncated weight file.
    let trunc = tmp.path().join("trunc");
    copy_dir(&model, &trunc);
    let weights = trunc.join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("weights");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("write");
    assert_clean_error(&medrl(&["generate", "--model", trunc.to_str().expect("utf-8"), "--prompt", "x"]), &["model.safetensors"]);

    // A malformed JSONL line names the file and line.
    let input = tmp.path().join("bad.jsonl");
    std::fs::write(&input, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 3}\n").expect("write");
    let out = medrl(&["score", "--model", m, "--input", input.to_str().expect("utf-8"), "--output", tmp.path().join("o.jsonl").to_str().expect("utf-8")]);
    assert_clean_error(&out, &["bad.jsonl:2", "prompt"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}
