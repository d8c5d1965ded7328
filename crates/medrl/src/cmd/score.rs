//! `medrl score`: log-probs of given completions, the contract the model is checked by.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use medrl_model::pipeline::{EncodedPrompt, Vlm};
use serde_json::{Map, Value};

use crate::runtime::DeviceArgs;

/// Arguments of `medrl score`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL: {"images": [paths relative to this file's folder], "prompt": "...", "completion": "..."}.
    #[arg(long)]
    pub input: PathBuf,
    /// JSONL: each input line plus "completion_token_ids" and "token_logprobs".
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub system: Option<String>,
    /// Lines scored together in one left-padded batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub runtime: DeviceArgs,
}

struct Item {
    line: Map<String, Value>,
    images: Vec<PathBuf>,
    prompt: String,
    completion: String,
}

fn parse_line(text: &str, path: &Path, n: usize) -> Result<Item> {
    let at = || format!("{}:{n}", path.display());
    let value: Value = serde_json::from_str(text).with_context(|| format!("{}: not valid JSON", at()))?;
    let Value::Object(line) = value else { bail!("{}: expected a JSON object", at()) };
    let field = |k: &str| -> Result<String> {
        line.get(k).and_then(Value::as_str).map(str::to_string).ok_or_else(|| anyhow!("{}: field `{k}` must be a string", at()))
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let images = match line.get("images") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(|p| base.join(p)).ok_or_else(|| anyhow!("{}: field `images` must be a list of paths", at())))
            .collect::<Result<_>>()?,
        Some(_) => bail!("{}: field `images` must be a list of paths", at()),
    };
    Ok(Item { images, prompt: field("prompt")?, completion: field("completion")?, line })
}

/// Scores every line and writes the output file atomically.
pub fn run(a: Args) -> Result<()> {
    let vlm = Vlm::load_for_inference(&a.model, a.runtime.dtype()?, &a.runtime.device()?).with_context(|| format!("loading model {}", a.model.display()))?;
    let file = std::fs::File::open(&a.input).with_context(|| format!("opening {}", a.input.display()))?;
    let mut items = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", a.input.display()))?;
        if !line.trim().is_empty() {
            items.push(parse_line(&line, &a.input, i + 1)?);
        }
    }
    let tmp = a.output.with_extension("jsonl.tmp");
    let result = write_scores(&vlm, &items, &a, &tmp).and_then(|()| std::fs::rename(&tmp, &a.output).with_context(|| format!("writing {}", a.output.display())));
    if result.is_err() {
        // A failed run leaves the previous output (if any) and nothing else; the error says why.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Scores `items` in batches into `tmp`.
fn write_scores(vlm: &Vlm, items: &[Item], a: &Args, tmp: &Path) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?);
    for chunk in items.chunks(a.batch_size.max(1)) {
        let mut batch = Vec::with_capacity(chunk.len());
        for item in chunk {
            let images = vlm.load_images(&item.images)?;
            let prompt: EncodedPrompt = vlm.user_prompt(a.system.as_deref(), images, &item.prompt)?;
            batch.push((prompt, item.completion.clone()));
        }
        for (item, (ids, lps)) in chunk.iter().zip(vlm.score(&batch)?) {
            let mut line = item.line.clone();
            line.insert("completion_token_ids".into(), ids.into());
            line.insert("token_logprobs".into(), lps.into());
            writeln!(out, "{}", Value::Object(line)).with_context(|| format!("writing {}", tmp.display()))?;
        }
    }
    out.flush().with_context(|| format!("writing {}", tmp.display()))
}
