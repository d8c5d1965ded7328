//! `evaluate` end to end on the tiny model: synthetic records with generated PNGs, n = 4
//! samples, a kill-like truncated samples file resumed without redoing finished items, and every
//! output file written.

use std::path::Path;

use candle_core::{DType, Device};
use medrl_eval::report::SupportThresholds;
use medrl_eval::{EvalConfig, EvalError, ItemSamples, Result, VqaRecord, evaluate, read_samples, write_outputs};
use medrl_model::pipeline::Vlm;
use medrl_model::tiny::{TinySpec, create_tiny};

fn records(dir: &Path) -> Result<Vec<VqaRecord>> {
    std::fs::create_dir_all(dir.join("img")).map_err(|e| EvalError::io(dir, e))?;
    let mut out = Vec::new();
    for i in 0..5u32 {
        let name = format!("img/{i}.png");
        let img = image::RgbImage::from_fn(48 + 8 * i, 40, |x, y| image::Rgb([(x * 5) as u8, (y * 6) as u8, (i * 40) as u8]));
        img.save(dir.join(&name)).map_err(|e| EvalError::Data(e.to_string()))?;
        let free_form = i == 4;
        out.push(VqaRecord {
            id: format!("syn/{i}"),
            dataset: if i % 2 == 0 { "pmc".into() } else { "slake".into() },
            modality: if i < 3 { "ct".into() } else { "xray".into() },
            images: vec![name],
            question: "Which finding is shown?".into(),
            options: if free_form { vec![] } else { vec!["nodule".into(), "effusion".into(), "normal".into()] },
            answer_label: if free_form { None } else { Some("B".into()) },
            answer: if free_form { "normal".into() } else { "effusion".into() },
        });
    }
    Ok(out)
}

fn lines(path: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?.lines().map(str::to_owned).collect())
}

#[test]
fn evaluate_resume_and_outputs_on_the_tiny_model() -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
    let model_dir = tmp.path().join("tiny");
    create_tiny(&model_dir, &TinySpec::default())?;
    let vlm = Vlm::load(&model_dir, DType::F32, &Device::Cpu)?;
    let data_dir = tmp.path().join("data");
    let recs = records(&data_dir)?;
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).map_err(|e| EvalError::io(&out, e))?;
    let samples = out.join("samples.jsonl");
    let config = EvalConfig { num_samples: 4, max_new_tokens: 6, batch_size: 2, ..EvalConfig::default() };

    // A first run over three records.
    let first = evaluate(&vlm, &recs, &data_dir, &EvalConfig { limit: Some(3), ..config.clone() }, &samples)?;
    assert_eq!(first.len(), 3);
    assert!(first.iter().all(|i| i.samples.len() == 4));

    // Simulate a kill: the third line half written. Mark the first item so a redo would show.
    let mut text = lines(&samples)?;
    assert_eq!(text.len(), 3);
    let mut marked: ItemSamples = serde_json::from_str(&text[0]).map_err(|e| EvalError::Data(e.to_string()))?;
    marked.greedy.text = "MARKER: finished before the kill".into();
    text[0] = serde_json::to_string(&marked).map_err(|e| EvalError::Data(e.to_string()))?;
    let half = text[2].len() / 2;
    let truncated = format!("{}\n{}\n{}", text[0], text[1], &text[2][..half]);
    std::fs::write(&samples, truncated).map_err(|e| EvalError::io(&samples, e))?;
    assert_eq!(read_samples(&samples)?.len(), 2, "the truncated line is ignored");

    // The rerun keeps finished items, redoes the truncated one and adds the rest.
    let all = evaluate(&vlm, &recs, &data_dir, &config, &samples)?;
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].greedy.text, "MARKER: finished before the kill");
    assert_eq!(all.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["syn/0", "syn/1", "syn/2", "syn/3", "syn/4"]);
    assert_eq!(lines(&samples)?.len(), 5);
    assert!(all[4].answer_label.is_none(), "free-form item keeps a null label");

    // Other generation settings must not be appended to the same file.
    let changed = evaluate(&vlm, &recs, &data_dir, &EvalConfig { num_samples: 2, ..config.clone() }, &samples);
    assert!(changed.err().is_some_and(|e| e.to_string().contains("generation settings")));

    let outputs = write_outputs(&all, &out, &SupportThresholds::default())?;
    assert_eq!(outputs.metrics.overall.items, 5);
    assert_eq!(outputs.metrics.overall.samples_per_item, 4);
    assert_eq!(outputs.metrics.by_dataset.len(), 2);
    assert_eq!(outputs.metrics.by_modality.len(), 2);
    for f in ["samples.jsonl", "metrics.json", "metrics.md", "support_gap.md", "passk.png", "passk.svg"] {
        let path = out.join(f);
        assert!(path.metadata().map(|m| m.len() > 0).unwrap_or(false), "{f} missing or empty");
    }
    Ok(())
}
