//! Metrics of sample files the tests generate, against hand-written and brute-force values:
//! unbiased Pass@k by enumerating every k-subset of each item's samples, and by exact integer
//! binomials; Acc@1, format failures and unique answers by direct counting.

use std::collections::{BTreeMap, HashSet};

use medrl_eval::report::SupportThresholds;
use medrl_eval::{EvalError, ItemSamples, Judged, Result, SamplesWriter, read_samples, write_outputs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random items: n samples each (c from 0 to n), three datasets, two modalities and an empty one.
fn random_items(seed: u64, count: usize, n: usize) -> Vec<ItemSamples> {
    let mut rng = StdRng::seed_from_u64(seed);
    let letters = ["A", "B", "C", "D", ""];
    (0..count)
        .map(|i| {
            let correct = rng.random_range(0..=n);
            let mut samples: Vec<Judged> = (0..n)
                .map(|s| {
                    let ok = s < correct;
                    let prediction = if ok { "A".to_owned() } else { letters[rng.random_range(1..letters.len())].to_owned() };
                    Judged { text: format!("<answer>{prediction}</answer>"), prediction, correct: ok, format_ok: rng.random_bool(0.7) }
                })
                .collect();
            // Order must not matter: shuffle the correct ones among the rest.
            for s in (1..samples.len()).rev() {
                samples.swap(s, rng.random_range(0..=s));
            }
            ItemSamples {
                id: format!("item-{i}"),
                dataset: ["pmc", "slake", "vqa-rad"][i % 3].to_owned(),
                modality: ["ct", "xray", ""][i % 3 / 2 + i % 2].to_owned(),
                answer_label: Some("A".to_owned()),
                answer: "yes".to_owned(),
                greedy: Judged { text: String::new(), prediction: "A".into(), correct: rng.random_bool(0.4), format_ok: rng.random_bool(0.8) },
                samples,
            }
        })
        .collect()
}

/// Fraction of k-subsets of the item's samples that hold a correct one, by enumeration.
fn brute_force_pass(item: &ItemSamples, k: u32) -> f64 {
    let n = item.samples.len() as u32;
    let mut correct_mask = 0u32;
    for (i, s) in item.samples.iter().enumerate() {
        if s.correct {
            correct_mask |= 1 << i;
        }
    }
    let (mut hits, mut total) = (0u64, 0u64);
    for subset in 0u32..(1 << n) {
        if subset.count_ones() == k {
            total += 1;
            hits += u64::from(subset & correct_mask != 0);
        }
    }
    hits as f64 / total as f64
}

/// 1 - C(n - c, k) / C(n, k) with exact integers.
fn binomial_pass(n: u128, c: u128, k: u128) -> f64 {
    let choose = |n: u128, k: u128| -> u128 { if k > n { 0 } else { (0..k).fold(1u128, |acc, i| acc * (n - i) / (i + 1)) } };
    1.0 - choose(n - c, k) as f64 / choose(n, k) as f64
}

fn tmp() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))
}

#[test]
fn pass_at_k_matches_brute_force_on_generated_files() -> Result<()> {
    let dir = tmp()?;
    let path = dir.path().join("samples.jsonl");
    let items = random_items(11, 30, 16);
    let (mut w, _) = SamplesWriter::open(&path)?;
    for item in &items {
        w.append(item)?;
    }
    drop(w);
    let read = read_samples(&path)?;
    assert_eq!(read, items);
    let out = write_outputs(&read, dir.path(), &SupportThresholds::default())?;
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("metrics.json")).map_err(|e| EvalError::io("metrics.json", e))?)
        .map_err(|e| EvalError::Data(e.to_string()))?;

    let mut groups: BTreeMap<(String, String), Vec<&ItemSamples>> = BTreeMap::new();
    for item in &items {
        groups.entry(("overall".into(), String::new())).or_default().push(item);
        groups.entry(("by_dataset".into(), item.dataset.clone())).or_default().push(item);
        let modality = if item.modality.is_empty() { "(unspecified)".to_owned() } else { item.modality.clone() };
        groups.entry(("by_modality".into(), modality)).or_default().push(item);
    }
    for ((scope, name), members) in &groups {
        let g = if scope == "overall" { &json["overall"] } else { &json[scope][name] };
        let m = members.len() as f64;
        for k in [1u32, 2, 4, 8, 16] {
            let brute = members.iter().map(|i| brute_force_pass(i, k)).sum::<f64>() / m;
            let exact = members.iter().map(|i| binomial_pass(16, i.correct_samples() as u128, u128::from(k))).sum::<f64>() / m;
            let got = g["pass_at_k"][k.to_string()].as_f64().unwrap_or(f64::NAN);
            assert!((got - brute).abs() < 1e-9, "{scope}/{name} pass@{k}: {got} vs brute force {brute}");
            assert!((got - exact).abs() < 1e-12, "{scope}/{name} pass@{k}: {got} vs binomial {exact}");
        }
        let acc = members.iter().filter(|i| i.greedy.correct).count() as f64 / m;
        assert_eq!(g["acc_at_1"].as_f64(), Some(acc), "{scope}/{name}");
        let fmt = members.iter().filter(|i| !i.samples.iter().any(|s| s.format_ok)).count() as f64 / m;
        assert_eq!(g["format_failure_rate"].as_f64(), Some(fmt));
        let unique = members
            .iter()
            .map(|i| i.samples.iter().filter(|s| !s.prediction.is_empty()).map(|s| &s.prediction).collect::<HashSet<_>>().len())
            .sum::<usize>() as f64
            / m;
        assert!((g["mean_unique_answers"].as_f64().unwrap_or(f64::NAN) - unique).abs() < 1e-12);
        assert_eq!(g["items"].as_u64(), Some(members.len() as u64));
    }
    assert_eq!(out.metrics.by_dataset.len(), 3);
    for f in ["metrics.json", "metrics.md", "support_gap.md", "support_gap.json", "passk.png", "passk.svg"] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    Ok(())
}

#[test]
fn hand_computed_small_file() -> Result<()> {
    // Two items, n = 4. Item a: greedy right, samples R W R W (c = 2). Item b: greedy wrong, c = 0.
    let j = |c: bool, p: &str| Judged { text: String::new(), prediction: p.into(), correct: c, format_ok: c };
    let a = ItemSamples {
        id: "a".into(),
        dataset: "d".into(),
        modality: "ct".into(),
        answer_label: Some("A".into()),
        answer: "x".into(),
        greedy: j(true, "A"),
        samples: vec![j(true, "A"), j(false, "B"), j(true, "A"), j(false, "")],
    };
    let b = ItemSamples { id: "b".into(), greedy: j(false, "C"), samples: vec![j(false, "C"); 4], ..a.clone() };
    let m = medrl_eval::compute_metrics(&[a, b])?;
    // pass@1 = (2/4 + 0)/2; pass@2 = (1 - 1/6)/2; pass@4 = 1/2; Acc@1 = 1/2.
    assert_eq!(m.overall.pass_at_k.get(&1), Some(&0.25));
    assert!((m.overall.pass_at_k[&2] - 5.0 / 12.0).abs() < 1e-15);
    assert_eq!(m.overall.pass_at_k.get(&4), Some(&0.5));
    assert_eq!(m.overall.acc_at_1, 0.5);
    // b used no tag in any sample.
    assert_eq!(m.overall.format_failure_rate, 0.5);
    // a: {A, B}; b: {C}.
    assert_eq!(m.overall.mean_unique_answers, 1.5);
    Ok(())
}

#[test]
fn mixed_sample_counts_limit_k() -> Result<()> {
    let mut items = random_items(3, 6, 16);
    items[2].samples.truncate(8);
    let m = medrl_eval::compute_metrics(&items)?;
    assert_eq!(m.overall.samples_per_item, 8);
    assert_eq!(m.overall.pass_at_k.keys().copied().collect::<Vec<_>>(), vec![1, 2, 4, 8]);
    let brute = items.iter().map(|i| brute_force_pass(i, 8)).sum::<f64>() / items.len() as f64;
    assert!((m.overall.pass_at_k[&8] - brute).abs() < 1e-9);
    Ok(())
}
