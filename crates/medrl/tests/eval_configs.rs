//! Every file in `configs/eval/` is read strictly by `medrl eval --config` (unknown or mistyped
//! keys name the key and the file) and carries the MedBridgeRL eval kit's settings, read from the
//! reference table (`paper-recipe.md` §7.3) beside the repository; a config's `data` and settings
//! drive a real evaluation of the tiny model, and flags override the file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use medrl_vqa::datasets::medmnist::Flag;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn medrl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medrl")).args(args).output().expect("medrl runs")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `medrl eval --config FILE --print-config [extra]` as JSON, or its stderr.
fn resolved(file: &Path, extra: &[&str]) -> Result<serde_json::Value, String> {
    let mut args = vec!["eval", "--config", s(file), "--print-config"];
    args.extend_from_slice(extra);
    let out = medrl(&args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Rows of the §7.3 sampling table: (setting, value text).
fn kit_table() -> Vec<(String, String)> {
    let path = repo().join("../shared/reference/paper-recipe.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (the shared folder must sit beside the repository)", path.display()));
    let start = text.find("### 7.3 Sampling defaults").expect("§7.3 heading");
    let end = text[start + 1..].find("\n#").map_or(text.len(), |i| start + 1 + i);
    text[start..end]
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| setting"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").collect();
            (cells.len() >= 2).then(|| (cells[0].trim().to_string(), cells[1].trim().to_string()))
        })
        .collect()
}

fn row<'a>(table: &'a [(String, String)], item: &str) -> &'a str {
    &table.iter().find(|(k, _)| k.starts_with(item)).unwrap_or_else(|| panic!("no row {item:?} in §7.3")).1
}

/// The last number of `text` (`1280·28·28 = 1,003,520` -> 1003520, `base seed 123` -> 123).
fn last_number(text: &str) -> f64 {
    let numbers: Vec<String> = text
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ','))
        .map(|t| t.replace(',', "").trim_end_matches('.').to_string())
        .filter(|t| !t.is_empty())
        .collect();
    numbers.last().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no number in {text:?}"))
}

fn eval_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("configs/eval"))
        .expect("configs/eval/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_eval_config_has_the_kit_settings() {
    let t = kit_table();
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
    let sampling: Vec<&str> = row(&t, "temperature / top-p / top-k").split(" / ").collect();
    let files = eval_files();
    let names: Vec<String> = files.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    for want in ["medvlthinker-six.yaml", "medmnist.yaml"] {
        assert!(names.iter().any(|n| n == want), "configs/eval/{want} missing; found {names:?}");
    }
    for file in &files {
        let at = file.display();
        let c = resolved(file, &[]).unwrap_or_else(|e| panic!("{at}: {e}"));
        let e = &c["eval"];
        assert_eq!(f(&e["num_samples"]), last_number(row(&t, "samples per item K")), "{at}");
        assert_eq!(f(&e["temperature"]), sampling[0].parse::<f64>().expect("temperature"), "{at}");
        assert_eq!(f(&e["top_p"]), sampling[1].parse::<f64>().expect("top-p"), "{at}");
        assert_eq!(sampling[2], "off");
        assert_eq!(f(&e["top_k"]), 0.0, "{at}: top-k off");
        assert_eq!(f(&e["max_new_tokens"]), last_number(row(&t, "max_new_tokens")), "{at}");
        assert_eq!(f(&e["seed"]), last_number(row(&t, "seed")), "{at}");
        assert_eq!(f(&e["min_pixels"]), last_number(row(&t, "min_pixels")), "{at}");
        assert_eq!(f(&e["max_pixels"]), last_number(row(&t, "max_pixels")), "{at}");
        assert_eq!(e["template"], "eval_kit", "{at}");
        assert!(e["limit"].is_null(), "{at}: every record is evaluated");
        // Greedy Acc@1 is always computed; Pass@k follows from n, the paper's K grid.
        let n = e["num_samples"].as_u64().expect("n");
        assert_eq!(medrl_eval::metrics::ks_for(n), vec![1, 2, 4, 8, 16], "{at}");
        assert!(c["data"].as_str().is_some_and(|d| d.ends_with(".jsonl")), "{at}: data names a records file");
        assert!(!c["description"].as_str().unwrap_or_default().is_empty(), "{at}");
    }
    let six = resolved(&repo().join("configs/eval/medvlthinker-six.yaml"), &[]).expect("six");
    let datasets: Vec<&str> = six["datasets"].as_array().expect("datasets").iter().filter_map(|d| d.as_str()).collect();
    assert_eq!(datasets, ["PMC-VQA", "MMMU", "MedXpertQA", "PathVQA", "SLAKE", "VQA-RAD"], "the six benchmarks of paper-recipe.md §10.1");
    let mnist = resolved(&repo().join("configs/eval/medmnist.yaml"), &[]).expect("medmnist");
    let flags: Vec<&str> = mnist["datasets"].as_array().expect("datasets").iter().filter_map(|d| d.as_str()).collect();
    assert_eq!(flags, Flag::ALL.map(Flag::name), "every 2D flag, as `medrl data medmnist` names them");
}

#[test]
fn typos_fail_naming_the_key_and_flags_override() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("bad-eval.yaml");
    for (text, key) in [
        ("data: x.jsonl\neval:\n  num_sample: 16\n", "num_sample"),
        ("dataset: [a]\neval: {}\n", "dataset"),
        ("eval:\n  temperature: warm\n", "temperature"),
        ("eval:\n  template: kit\n", "template"),
    ] {
        std::fs::write(&bad, text).expect("write");
        let err = resolved(&bad, &[]).expect_err(text);
        assert!(err.contains(key) && err.contains("bad-eval.yaml") && !err.contains("panicked"), "{text:?}: {err}");
    }
    // An invalid value is refused too, with the setting's name.
    std::fs::write(&bad, "eval:\n  top_p: 1.5\n").expect("write");
    assert!(resolved(&bad, &[]).expect_err("top_p").contains("top_p"));
    // A file holding only the section's keys (the earlier form) still reads.
    let section = tmp.path().join("section.json");
    std::fs::write(&section, r#"{"num_samples": 4, "temperature": 1.0}"#).expect("write");
    let c = resolved(&section, &[]).expect("section alone");
    assert_eq!((c["eval"]["num_samples"].as_u64(), c["eval"]["temperature"].as_f64()), (Some(4), Some(1.0)));
    // Flags override the file.
    let six = repo().join("configs/eval/medvlthinker-six.yaml");
    let c = resolved(&six, &["--num-samples", "8", "--data", "other.jsonl", "--limit", "5"]).expect("overrides");
    assert_eq!((c["eval"]["num_samples"].as_u64(), c["data"].as_str(), c["eval"]["limit"].as_u64()), (Some(8), Some("other.jsonl"), Some(5)));
    assert_eq!(c["eval"]["temperature"].as_f64(), Some(0.7), "the rest stays as the file says");
}

#[test]
fn a_config_drives_a_real_evaluation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("model");
    let o = medrl(&["tiny-model", "--out", s(&model)]);
    assert!(o.status.success(), "tiny-model: {}", String::from_utf8_lossy(&o.stderr));
    let data = tmp.path().join("data/records.jsonl");
    let o = medrl(&["data", "synthetic", "--out", s(&data), "--count", "4"]);
    assert!(o.status.success(), "data synthetic: {}", String::from_utf8_lossy(&o.stderr));
    let config = tmp.path().join("eval.yaml");
    let text = format!(
        "description: tiny\ndata: {}\ndatasets: [synthetic, absent-bench]\neval:\n  num_samples: 2\n  max_new_tokens: 6\n  limit: 3\n  batch_size: 2\n",
        s(&data)
    );
    std::fs::write(&config, text).expect("write");
    let out = tmp.path().join("out");
    // No --data: the records come from the config.
    let o = medrl(&["eval", "--model", s(&model), "--config", s(&config), "--out", s(&out)]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "eval --config: {stderr}");
    assert!(stderr.contains("absent-bench") && !stderr.contains("\"synthetic\""), "only the absent dataset is reported: {stderr}");
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).expect("metrics.json")).expect("json");
    assert_eq!(metrics["overall"]["items"].as_u64(), Some(3), "limit 3");
    assert_eq!(metrics["overall"]["samples_per_item"].as_u64(), Some(2), "num_samples 2");
    let settings: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("eval_settings.json")).expect("settings")).expect("json");
    assert_eq!(settings["generation"]["max_new_tokens"].as_u64(), Some(6));
    assert_eq!(settings["template"], "eval_kit");
    // Without --data and without a config's data, a model run is refused cleanly.
    let o = medrl(&["eval", "--model", s(&model), "--out", s(&out)]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--data"));
}
