//! `medrl data` runs as a real process: synthetic data, a balanced subset of it written to
//! another folder (image links must still resolve), a LLaVA round trip, and clean errors.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

fn medrl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medrl")).args(args).output().expect("medrl runs")
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The records of a JSONL file, as JSON values.
fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .expect("read jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[test]
fn synthetic_then_balanced_subset() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let train = tmp.path().join("train.jsonl");
    let stdout = ok(&medrl(&["data", "synthetic", "--out", s(&train), "--count", "120", "--seed", "5"]));
    assert!(stdout.contains("wrote 120 records"), "{stdout}");
    let records = lines(&train);
    assert_eq!(records.len(), 120);
    for r in &records {
        assert_eq!(r["dataset"], "synthetic");
        let img = tmp.path().join(r["images"][0].as_str().expect("image path"));
        assert!(img.is_file(), "{} missing", img.display());
    }

    let sub = tmp.path().join("sets").join("subset.jsonl");
    let args = ["data", "subset", "--input", s(&train), "--out", s(&sub), "--size", "40", "--seed", "2", "--by", "modality"];
    let stdout = ok(&medrl(&args));
    assert!(stdout.contains("balanced by [answer, modality]") && stdout.contains("wrote 40 records"), "{stdout}");
    let first = std::fs::read(&sub).expect("subset");
    ok(&medrl(&args));
    assert_eq!(std::fs::read(&sub).expect("subset again"), first, "same seed, same bytes");

    let chosen = lines(&sub);
    assert_eq!(chosen.len(), 40);
    let mut per_family: BTreeMap<String, usize> = BTreeMap::new();
    for r in &chosen {
        *per_family.entry(r["modality"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
        let link = r["images"][0].as_str().expect("image path");
        assert!(link.starts_with("../images/train/"), "rebased link: {link}");
        assert!(sub.parent().expect("folder").join(link).is_file(), "{link} does not resolve");
    }
    assert_eq!(per_family.values().copied().collect::<Vec<_>>(), vec![8; 5], "{per_family:?}");

    // Records -> LLaVA -> records keeps every record.
    let llava = tmp.path().join("rl.jsonl");
    let back = tmp.path().join("back.jsonl");
    ok(&medrl(&["data", "llava", "to", "--input", s(&sub), "--out", s(&llava)]));
    let stdout = ok(&medrl(&["data", "llava", "from", "--input", s(&llava), "--out", s(&back)]));
    assert!(stdout.contains("40 rows, 40 with options (40 letter gold"), "{stdout}");
    let mut a = lines(&back);
    let mut b: Vec<serde_json::Value> = lines(&sub);
    for r in b.iter_mut() {
        // `back.jsonl` sits one folder up from `sets/subset.jsonl`.
        let link = r["images"][0].as_str().expect("path").trim_start_matches("../").to_owned();
        r["images"][0] = serde_json::Value::String(link);
    }
    a.sort_by_key(|r| r["id"].to_string());
    b.sort_by_key(|r| r["id"].to_string());
    assert_eq!(a, b);
}

#[test]
fn bad_inputs_fail_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("o.jsonl");
    let missing = tmp.path().join("absent.jsonl");
    for args in [
        vec!["data", "subset", "--input", s(&missing), "--out", s(&out), "--size", "3"],
        vec!["data", "synthetic", "--out", s(&out), "--canvas", "60"],
        vec!["data", "synthetic", "--out", s(&out), "--families", "size"],
    ] {
        let o = medrl(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && !err.contains("panicked"), "{args:?}: {err}");
    }
    let csv = tmp.path().join("train.csv");
    std::fs::write(&csv, "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\na.jpg,Q,x,A:x,B:y,C:z,D:w,A\nb.jpg,Q,x,A:x,C:y,C:z,D:w,A\n").expect("csv");
    let stdout = ok(&medrl(&["data", "pmc-vqa", "--csv", s(&csv), "--images", s(tmp.path()), "--out", s(&out)]));
    assert!(stdout.contains("2 rows, 1 kept, 1 dropped") && stdout.contains("wrote 1 records"), "{stdout}");
}
