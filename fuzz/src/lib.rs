//! The bodies of medrl's fuzz targets, one function per target, so the same harness runs under
//! libFuzzer (`cargo +nightly fuzz run <target>`), as a stable replay binary
//! (`--no-default-features`), and in this crate's seed tests (`cargo test`).
//!
//! Each function must never panic on any input; where the parsed value has a property worth
//! checking (rewards are 0 or 1, records validate and round-trip), it asserts it, so libFuzzer
//! reports a violation as a crash with the input saved.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use medrl_vqa::reward::{
    Gold, RewardConfig, accuracy_reward, clean_text, eval_kit_judge, extract_answer_tag, format_reward, med_vl_thinker_accuracy,
    normalize_text, parse_freeform, parse_mcq_letter,
};

/// Splits an input into up to `n` text fields at 0xFF bytes (never valid UTF-8, so a separator
/// the fuzzer can place but that no text field can contain), lossily decoded.
fn fields(data: &[u8], n: usize) -> Vec<String> {
    let mut out: Vec<String> = data.splitn(n, |b| *b == 0xFF).map(|part| String::from_utf8_lossy(part).into_owned()).collect();
    out.resize(n, String::new());
    out
}

fn is_binary_reward(x: f64) -> bool {
    x == 0.0 || x == 1.0
}

/// Answer parsers and rewards: input = completion 0xFF gold answer 0xFF options (newline-separated)
/// 0xFF label selector. The gold is shaped as a validated record's is (a label is one letter
/// naming an existing option, and the answer is that option's text), since the rewards only
/// ever see validated records. Every reward is 0 or 1, the weighted total is finite, a correct
/// judgement has a prediction, and parsers do not panic.
pub fn answer_rewards(data: &[u8]) {
    let f = fields(data, 4);
    let completion = &f[0];
    let mut options: Vec<String> = if f[2].is_empty() { Vec::new() } else { f[2].split('\n').map(str::to_string).collect() };
    options.truncate(26);
    // The selector's first byte picks the correct option; no selector (or no options): free-form.
    let chosen = match (f[3].as_bytes().first(), options.len()) {
        (Some(&b), n) if n > 0 => Some(usize::from(b) % n),
        _ => None,
    };
    let letters: Vec<String> = (b'A'..=b'Z').map(|c| char::from(c).to_string()).collect();
    let label = chosen.map(|i| letters[i].as_str());
    let answer = chosen.map_or(f[1].as_str(), |i| options[i].as_str());
    let record = medrl_vqa::VqaRecord {
        id: "fuzz".into(),
        dataset: "fuzz".into(),
        modality: String::new(),
        images: Vec::new(),
        question: String::new(),
        options: options.clone(),
        answer_label: label.map(str::to_string),
        answer: answer.to_string(),
    };
    assert!(record.validate().is_ok(), "the harness builds valid golds");
    let gold = Gold { answer, label, options: &options };

    let outcome = RewardConfig::default().score(completion, &gold);
    let c = outcome.components;
    for (name, value) in [("format", c.format), ("accuracy", c.accuracy), ("med_vl_thinker", c.med_vl_thinker), ("eval_kit", c.eval_kit)] {
        assert!(is_binary_reward(value), "{name} reward {value} is not 0 or 1");
    }
    assert!(outcome.total.is_finite());
    assert!(is_binary_reward(format_reward(completion)));
    assert!(is_binary_reward(accuracy_reward(completion, answer)));
    assert!(is_binary_reward(med_vl_thinker_accuracy(completion, answer, label)));
    let judgement = eval_kit_judge(completion, &gold);
    if judgement.correct {
        assert!(!judgement.prediction.is_empty(), "a correct judgement needs a prediction");
    }
    if let Some(inner) = extract_answer_tag(completion) {
        // The tag's content is a slice of the completion.
        assert!(completion.contains(inner.trim()));
    }
    if let Some(letter) = parse_mcq_letter(completion, options.len()) {
        assert!(letter.is_ascii_uppercase() && ((letter as u8 - b'A') as usize) < options.len(), "letter {letter} out of range");
    }
    let _ = parse_freeform(completion);
    let _ = normalize_text(completion);
    let _ = clean_text(completion);
}

/// The model config loader: any text either parses into a config or is an error with a message;
/// never a panic. (No round-trip property: the loader accepts two layouts and normalises them.)
pub fn model_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz/config.json");
    if let Err(e) = medrl_model::config::Config::from_json_str(text, path) {
        let message = e.to_string();
        assert!(!message.is_empty());
    }
}

thread_local! {
    /// One scratch file per thread, rewritten for every input (readers take paths).
    static SCRATCH: RefCell<Option<(tempfile::TempDir, PathBuf)>> = const { RefCell::new(None) };
}

/// Writes `data` to this thread's scratch file named `name` and runs `f` on its path.
fn with_file<R>(name: &str, data: &[u8], f: impl FnOnce(&Path) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let dir = tempfile::tempdir().expect("a temporary directory for fuzz inputs");
            let path = dir.path().to_path_buf();
            *slot = Some((dir, path));
        }
        let (_, dir) = slot.as_ref().expect("initialised above");
        let path = dir.join(name);
        std::fs::write(&path, data).expect("writing the fuzz input");
        f(&path)
    })
}

/// The record JSONL reader: every record it returns validates, and writing then re-reading them
/// gives the same records (nothing lost or altered by a round trip).
pub fn vqa_records(data: &[u8]) {
    let Ok(records) = with_file("records.jsonl", data, medrl_vqa::read_records) else { return };
    for r in &records {
        assert!(r.validate().is_ok(), "read_records returned an invalid record {:?}", r.id);
    }
    let again = with_file("roundtrip.jsonl", &[], |path| {
        medrl_vqa::write_records(path, &records).expect("writing records that were just read");
        medrl_vqa::read_records(path).expect("re-reading records that were just written")
    });
    assert_eq!(again, records, "records changed in a write/read round trip");
}

/// The eval samples JSONL reader (truncated tails are tolerated by design, bad lines are errors).
pub fn eval_samples(data: &[u8]) {
    if let Ok(items) = with_file("samples.jsonl", data, medrl_eval::samples::read_samples) {
        let mut ids = std::collections::HashSet::new();
        for item in &items {
            assert!(ids.insert(item.id.clone()), "read_samples returned the id {:?} twice", item.id);
        }
    }
}

/// The PMC-VQA CSV loader: kept records validate, and every row is either kept or counted as
/// dropped.
pub fn pmc_vqa_csv(data: &[u8]) {
    let opts = medrl_vqa::datasets::pmc_vqa::PmcVqaOptions { image_prefix: "images".into(), check_images_in: None, split: Some("fuzz".into()) };
    if let Ok((records, _report)) = with_file("train.csv", data, |path| medrl_vqa::datasets::pmc_vqa::load_pmc_vqa(path, &opts)) {
        for r in &records {
            assert!(r.validate().is_ok(), "load_pmc_vqa kept an invalid record {:?}", r.id);
        }
    }
}

/// The image decoder: any bytes decode or fail with an error; headers claiming huge sizes are
/// refused before allocation (libFuzzer's RSS limit turns an allocation bomb into a crash).
pub fn image_decode(data: &[u8]) {
    if let Ok(img) = medrl_model::image::decode_image(data, "fuzz-input") {
        assert!(img.width() > 0 && img.height() > 0, "a decoded image is never zero-sized");
        assert!(u64::from(img.width()) * u64::from(img.height()) <= medrl_model::image::MAX_DECODE_PIXELS);
    }
}

/// Runs `target` on every file named on the command line (the stable stand-in for libFuzzer's
/// reproducer mode); directories are walked one level deep.
pub fn replay_args(target: fn(&[u8])) -> ExitCode {
    let mut files = Vec::new();
    for arg in std::env::args_os().skip(1) {
        let path = PathBuf::from(arg);
        match std::fs::read_dir(&path) {
            Ok(entries) => files.extend(entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file())),
            Err(_) => files.push(path),
        }
    }
    if files.is_empty() {
        eprintln!("usage: <target> FILE_OR_DIR...  (replays inputs; build with the `libfuzzer` feature to fuzz)");
        return ExitCode::FAILURE;
    }
    for file in &files {
        match std::fs::read(file) {
            Ok(data) => {
                target(&data);
                println!("ok {}", file.display());
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    //! Seed inputs through every harness: the targets build and their properties hold on the
    //! interesting cases, on stable, without libFuzzer.

    use super::*;

    fn seeds(dir: &str) -> Vec<Vec<u8>> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(dir);
        let mut out: Vec<Vec<u8>> = std::fs::read_dir(&path)
            .map(|entries| entries.filter_map(|e| e.ok()).filter_map(|e| std::fs::read(e.path()).ok()).collect())
            .unwrap_or_default();
        out.extend([Vec::new(), vec![0xFF; 3], b"\0".to_vec(), "\u{1F601}<answer>".as_bytes().to_vec()]);
        out
    }

    #[test]
    fn answer_rewards_seeds() {
        for s in seeds("answer_rewards") {
            answer_rewards(&s);
        }
        answer_rewards(b"<think>x</think><answer>B</answer>\xFFRight lung\xFFLeft lung\nRight lung\xFFB");
    }

    #[test]
    fn model_config_seeds() {
        for s in seeds("model_config") {
            model_config(&s);
        }
    }

    #[test]
    fn vqa_records_seeds() {
        for s in seeds("vqa_records") {
            vqa_records(&s);
        }
    }

    #[test]
    fn eval_samples_seeds() {
        for s in seeds("eval_samples") {
            eval_samples(&s);
        }
    }

    #[test]
    fn pmc_vqa_csv_seeds() {
        for s in seeds("pmc_vqa_csv") {
            pmc_vqa_csv(&s);
        }
    }

    #[test]
    fn image_decode_seeds() {
        for s in seeds("image_decode") {
            image_decode(&s);
        }
    }
}
