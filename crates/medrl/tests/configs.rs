//! Every file in `configs/` is a valid run config, a typo in one is an error naming the key, and
//! the paper's config matches the hyperparameter table of the reference (`paper-recipe.md` §5),
//! read from the shared folder beside the repository.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn resolved(file: &Path, extra: &[&str]) -> Result<serde_json::Value, String> {
    let mut args = vec!["config", "--json", "--config", file.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_medrl")).args(&args).output().expect("medrl runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

#[test]
fn every_config_file_is_valid_and_typos_fail() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("configs")).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            resolved(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 2, "configs/ holds the default and the paper's run");
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "learner:\n  max_grad_nrom: 5\n").expect("write");
    let err = resolved(&bad, &[]).expect_err("typo");
    assert!(err.contains("max_grad_nrom") && err.contains("bad.yaml"), "{err}");
    std::fs::write(&bad, "rollout:\n  group_size: eight\n").expect("write");
    assert!(resolved(&bad, &[]).expect_err("type").contains("group_size"));
}

/// Rows of the §5 table: (item, value text).
fn paper_table() -> Vec<(String, String)> {
    let path = repo().join("../shared/reference/paper-recipe.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (the shared folder must sit beside the repository)", path.display()));
    let start = text.find("## 5. Hyperparameters").expect("§5 heading");
    let end = text[start..].find("\n## ").map_or(text.len(), |i| start + i);
    text[start..end]
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| item") && !l.starts_with("|---"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").collect();
            (cells.len() >= 2).then(|| (cells[0].trim().to_string(), cells[1].trim().to_string()))
        })
        .collect()
}

fn row<'a>(table: &'a [(String, String)], item: &str) -> &'a str {
    &table.iter().find(|(k, _)| k.starts_with(item)).unwrap_or_else(|| panic!("no row {item:?} in the table")).1
}

/// The number right after `flag` in `text` (e.g. `--max_grad_norm 5`).
fn number_after(text: &str, flag: &str) -> f64 {
    let at = text.find(flag).unwrap_or_else(|| panic!("{flag:?} not in {text:?}")) + flag.len();
    let digits: String = text[at..].trim_start_matches([' ', '=', '`']).chars().take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | '-' | ',')).filter(|c| *c != ',').collect();
    digits.trim_end_matches('.').parse().unwrap_or_else(|_| panic!("no number after {flag:?} in {text:?}"))
}

#[test]
fn the_paper_config_matches_the_reference_table() {
    let t = paper_table();
    let c = resolved(&repo().join("configs/octomed-7b-pmc-vqa-8k.yaml"), &[]).expect("valid");
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
    assert_eq!(f(&c["rollout"]["group_size"]), number_after(row(&t, "group size"), "--num_generations"));
    assert_eq!(f(&c["rollout"]["prompts_per_lease"]), number_after(row(&t, "batch"), "--per_device_train_batch_size"));
    assert!(row(&t, "batch").contains("4 prompts"), "the table's step has 4 prompts");
    assert_eq!(f(&c["coordinator"]["prompts_per_step"]), 4.0);
    assert_eq!(f(&c["coordinator"]["epochs"]), number_after(row(&t, "epochs"), "--num_train_epochs"));
    assert_eq!(f(&c["coordinator"]["seed"]), number_after(row(&t, "epochs"), "--data_seed"));
    assert_eq!(f(&c["learner"]["optimizer"]["lr"]), number_after(row(&t, "learning rate"), "--learning_rate"));
    let opt = row(&t, "optimizer");
    assert!(opt.contains("AdamW") && opt.contains("linear decay") && opt.contains("0 warm-up") && opt.contains("weight decay 0"), "{opt}");
    assert_eq!(c["learner"]["optimizer"]["kind"], "adamw");
    assert_eq!(c["learner"]["schedule"]["kind"], "linear");
    assert_eq!(f(&c["learner"]["schedule"]["warmup_steps"]), 0.0);
    assert_eq!(f(&c["learner"]["optimizer"]["weight_decay"]), 0.0);
    // medrl's learner is one GPU, where a full 7B AdamW state fits only in host memory.
    assert_eq!(c["learner"]["optimizer"]["offload"], true, "docs/memory.md");
    assert_eq!(f(&c["learner"]["max_grad_norm"]), number_after(row(&t, "gradient clipping"), "--max_grad_norm"));
    assert_eq!(f(&c["algorithm"]["loss"]["beta"]), number_after(row(&t, "KL"), "--beta"));
    let sampling = row(&t, "rollout sampling");
    assert_eq!(f(&c["rollout"]["temperature"]), number_after(sampling, "temperature"));
    assert_eq!(f(&c["rollout"]["top_p"]), number_after(sampling, "default **"));
    let lengths = row(&t, "lengths");
    assert_eq!(f(&c["rollout"]["max_prompt_tokens"]), number_after(lengths, "--max_prompt_length"));
    assert_eq!(f(&c["rollout"]["max_new_tokens"]), number_after(lengths, "--max_completion_length"));
    assert_eq!(f(&c["algorithm"]["loss"]["max_completion_length"]), number_after(lengths, "--max_completion_length"));
    let image = row(&t, "image size");
    assert_eq!(f(&c["model"]["max_pixels"]), number_after(image, "max_pixels"));
    assert_eq!(f(&c["model"]["min_pixels"]), number_after(image, "default"));
    let precision = row(&t, "precision");
    assert!(precision.contains("--bf16 true") && precision.contains("--gradient_checkpointing true"), "{precision}");
    assert_eq!(c["model"]["dtype"], "bf16");
    assert_eq!(c["learner"]["gradient_checkpointing"], true);
    assert!(row(&t, "vision tower").contains("trained"));
    assert_eq!(c["learner"]["trainable"], "all");
    let care = row(&t, "CARE switches");
    assert!(care.contains("--use_care true"));
    assert_eq!(c["algorithm"]["name"], "grpo_care");
    assert_eq!(f(&c["algorithm"]["care"]["bonus_coefficient"]), number_after(care, "--bonus_coefficient"));
    assert_eq!(f(&c["algorithm"]["care"]["confidence_upper_bound"]), number_after(care, "--confidence_upper_bound"));
    assert_eq!(f(&c["algorithm"]["care"]["consistency_margin"]), number_after(care, "--consistency_margin"));
    assert_eq!(f(&c["algorithm"]["ema"]["decay"]), number_after(care, "--ref_ema_decay"));
    assert_eq!(f(&c["algorithm"]["ema"]["every"]), number_after(care, "--ref_ema_update_every"));
    assert_eq!(f(&c["learner"]["save_every"]), number_after(row(&t, "checkpoints"), "--save_steps"));
    let rewards = row(&t, "reward functions");
    assert!(rewards.contains("accuracy") && rewards.contains("format") && rewards.contains("weight 1"), "{rewards}");
    assert_eq!(f(&c["algorithm"]["rewards"]["weights"]["accuracy"]), 1.0);
    assert_eq!(f(&c["algorithm"]["rewards"]["weights"]["format"]), 1.0);
    assert_eq!(f(&c["algorithm"]["rewards"]["weights"]["med_vl_thinker"]), 0.0);
    assert_eq!(c["algorithm"]["template"], "r1v");
}
