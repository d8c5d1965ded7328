//! A small Qwen2-style byte-level BPE tokenizer, built deterministically from a built-in corpus,
//! for medrl's tiny default model (so tests and demos need no downloaded tokenizer).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

use crate::chat::DEFAULT_CHAT_TEMPLATE;
use crate::error::{Error, Result};

/// The Qwen2 pre-tokenisation regex.
pub const QWEN2_SPLIT_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Total vocabulary of the tiny tokenizer: byte tokens, learned merges and added tokens.
pub const TINY_VOCAB_SIZE: usize = 512;

/// Added special tokens, in id order after the BPE vocabulary.
const SPECIAL_TOKENS: [&str; 8] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];
/// Added non-special tokens: kept whole when encoding, and kept when decoding with skip_special_tokens.
const TAG_TOKENS: [&str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];
const BPE_VOCAB_SIZE: usize = TINY_VOCAB_SIZE - SPECIAL_TOKENS.len() - TAG_TOKENS.len();

/// Token ids the model config needs, as laid out by the tiny tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokenIds {
    /// `<|endoftext|>` (bos / pad).
    pub endoftext: u32,
    /// `<|im_start|>`.
    pub im_start: u32,
    /// `<|im_end|>` (eos).
    pub im_end: u32,
    /// `<|vision_start|>`.
    pub vision_start: u32,
    /// `<|vision_end|>`.
    pub vision_end: u32,
    /// `<|vision_pad|>` (`vision_token_id`).
    pub vision_pad: u32,
    /// `<|image_pad|>` (`image_token_id`).
    pub image_pad: u32,
    /// `<|video_pad|>` (`video_token_id`).
    pub video_pad: u32,
    /// Number of ids, added tokens included.
    pub vocab_size: usize,
}

/// The tiny tokenizer's two files, as text, plus the ids they assign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyTokenizer {
    /// Contents of `tokenizer.json`.
    pub tokenizer_json: String,
    /// Contents of `tokenizer_config.json` (with the bundled chat template).
    pub tokenizer_config_json: String,
    /// Ids of the special tokens and the vocabulary size.
    pub ids: SpecialTokenIds,
}

impl TinyTokenizer {
    /// Learns the merges from the built-in corpus and assembles both files; the same bytes every run.
    pub fn build() -> Result<Self> {
        let bytes = byte_chars();
        let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();

        // Pre-tokenise exactly as the final tokenizer will, using a merge-less copy of it.
        let bare = parse(&tokenizer_json_value(&vocab, &[])?)?;
        let pre = bare
            .get_pre_tokenizer()
            .ok_or_else(|| tiny_err("pre-tokenizer missing"))?;
        let mut words: BTreeMap<String, u64> = BTreeMap::new();
        for line in tiny_corpus().lines() {
            // Added tokens never reach the BPE model, so learning merges for them would waste vocabulary.
            let mut pieces = vec![line.to_string()];
            for tag in TAG_TOKENS.iter().chain(SPECIAL_TOKENS.iter()) {
                pieces = pieces
                    .iter()
                    .flat_map(|p| p.split(tag).map(str::to_string).collect::<Vec<_>>())
                    .collect();
            }
            for piece in pieces.iter().filter(|p| !p.is_empty()) {
                let mut pts = PreTokenizedString::from(format!("{piece}\n").as_str());
                pre.pre_tokenize(&mut pts).map_err(|e| tiny_err(e.to_string()))?;
                for (s, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                    *words.entry(s.to_string()).or_insert(0) += 1;
                }
            }
        }
        let merges = learn_merges(&words, &mut vocab, &bytes, BPE_VOCAB_SIZE)?;

        let tj = tokenizer_json_value(&vocab, &merges)?;
        // Round-trip through the tokenizers crate so the file is in its canonical, loadable form.
        let tokenizer = parse(&tj)?;
        let tokenizer_json = tokenizer.to_string(true).map_err(|e| tiny_err(e.to_string()))?;
        let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| tiny_err(format!("{t} missing")));
        let ids = SpecialTokenIds {
            endoftext: id("<|endoftext|>")?,
            im_start: id("<|im_start|>")?,
            im_end: id("<|im_end|>")?,
            vision_start: id("<|vision_start|>")?,
            vision_end: id("<|vision_end|>")?,
            vision_pad: id("<|vision_pad|>")?,
            image_pad: id("<|image_pad|>")?,
            video_pad: id("<|video_pad|>")?,
            vocab_size: tokenizer.get_vocab_size(true),
        };
        let tokenizer_config_json = tokenizer_config(vocab.len())?;
        Ok(TinyTokenizer {
            tokenizer_json,
            tokenizer_config_json,
            ids,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (which must exist).
    pub fn write(&self, dir: &Path) -> Result<()> {
        for (name, text) in [
            ("tokenizer.json", &self.tokenizer_json),
            ("tokenizer_config.json", &self.tokenizer_config_json),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    }

    /// The tokenizer as a `tokenizers::Tokenizer`.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        self.tokenizer_json
            .parse::<Tokenizer>()
            .map_err(|e| tiny_err(e.to_string()))
    }
}

/// Builds the tiny tokenizer and writes its files into `dir`; returns the ids the model config needs.
pub fn write_tiny_tokenizer(dir: &Path) -> Result<SpecialTokenIds> {
    let t = TinyTokenizer::build()?;
    t.write(dir)?;
    Ok(t.ids)
}

fn tiny_err(problem: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: PathBuf::from("<tiny tokenizer>"),
        problem: problem.into(),
    }
}

fn parse(v: &Value) -> Result<Tokenizer> {
    serde_json::to_string(v)
        .map_err(|e| tiny_err(e.to_string()))?
        .parse::<Tokenizer>()
        .map_err(|e| tiny_err(e.to_string()))
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest to U+0100 onwards.
fn byte_chars() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

// Classic BPE: repeatedly merge the most frequent adjacent pair, ties broken by the smaller
// (left id, right id), so the result depends only on the corpus.
fn learn_merges(
    words: &BTreeMap<String, u64>,
    vocab: &mut Vec<String>,
    bytes: &[char],
    target: usize,
) -> Result<Vec<(String, String)>> {
    let char_id: HashMap<char, u32> = bytes.iter().enumerate().map(|(i, c)| (*c, i as u32)).collect();
    let mut seqs: Vec<(Vec<u32>, u64)> = Vec::with_capacity(words.len());
    for (w, n) in words {
        let ids = w
            .chars()
            .map(|c| {
                char_id
                    .get(&c)
                    .copied()
                    .ok_or_else(|| tiny_err(format!("non byte-level char {c:?}")))
            })
            .collect::<Result<Vec<u32>>>()?;
        seqs.push((ids, *n));
    }
    let mut index: HashMap<String, u32> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut merges = Vec::new();
    while vocab.len() < target {
        let mut counts: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for (s, n) in &seqs {
            for pair in s.windows(2) {
                *counts.entry((pair[0], pair[1])).or_insert(0) += n;
            }
        }
        // Max count; BTreeMap iteration is ascending, so `>` keeps the smallest pair on ties.
        let mut best: Option<((u32, u32), u64)> = None;
        for (&pair, &n) in &counts {
            if best.is_none_or(|(_, bn)| n > bn) {
                best = Some((pair, n));
            }
        }
        let Some(((a, b), n)) = best else { break };
        if n < 2 {
            break;
        }
        let merged = format!("{}{}", vocab[a as usize], vocab[b as usize]);
        let new_id = match index.get(&merged) {
            Some(&id) => id,
            None => {
                let id = vocab.len() as u32;
                vocab.push(merged.clone());
                index.insert(merged, id);
                id
            }
        };
        merges.push((vocab[a as usize].clone(), vocab[b as usize].clone()));
        for (s, _) in &mut seqs {
            let mut i = 0;
            let mut out = Vec::with_capacity(s.len());
            while i < s.len() {
                if i + 1 < s.len() && s[i] == a && s[i + 1] == b {
                    out.push(new_id);
                    i += 2;
                } else {
                    out.push(s[i]);
                    i += 1;
                }
            }
            *s = out;
        }
    }
    Ok(merges)
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special
    })
}

fn all_added() -> impl Iterator<Item = (&'static str, bool)> {
    SPECIAL_TOKENS
        .iter()
        .map(|t| (*t, true))
        .chain(TAG_TOKENS.iter().map(|t| (*t, false)))
}

fn tokenizer_json_value(vocab: &[String], merges: &[(String, String)]) -> Result<Value> {
    let vocab_map: serde_json::Map<String, Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<Value> = all_added()
        .enumerate()
        .map(|(i, (t, special))| added_token(vocab.len() + i, t, special))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()
        }
    }))
}

fn tokenizer_config(bpe_len: usize) -> Result<String> {
    let mut decoder = serde_json::Map::new();
    for (i, (t, special)) in all_added().enumerate() {
        decoder.insert(
            (bpe_len + i).to_string(),
            json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": special}),
        );
    }
    let cfg = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": SPECIAL_TOKENS[1..].to_vec(),
        "bos_token": null,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": false,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": null
    });
    serde_json::to_string_pretty(&cfg).map_err(|e| tiny_err(e.to_string()))
}

/// The built-in training text: VQA-style questions and answers about synthetic shapes plus medical
/// vocabulary, generated from fixed lists so it never changes between runs.
pub fn tiny_corpus() -> String {
    const SHAPES: [&str; 8] = [
        "circle",
        "square",
        "triangle",
        "star",
        "hexagon",
        "rectangle",
        "ellipse",
        "cross",
    ];
    const COLOURS: [&str; 9] = [
        "red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray",
    ];
    const POSITIONS: [&str; 9] = [
        "top left",
        "top right",
        "bottom left",
        "bottom right",
        "center",
        "left",
        "right",
        "top",
        "bottom",
    ];
    const NUMBERS: [&str; 10] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    const MEDICAL: [&str; 36] = [
        "lung",
        "heart",
        "liver",
        "kidney",
        "brain",
        "spleen",
        "tumor",
        "lesion",
        "fracture",
        "effusion",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "cardiomegaly",
        "edema",
        "opacity",
        "mass",
        "abnormality",
        "normal",
        "abnormal",
        "benign",
        "malignant",
        "patient",
        "diagnosis",
        "organ",
        "tissue",
        "retina",
        "fundus",
        "skin",
        "melanoma",
        "chest",
        "abdomen",
        "pathology",
        "histology",
        "dermatology",
        "radiology",
    ];
    const MODALITIES: [&str; 6] = ["CT", "MRI", "X-ray", "ultrasound", "microscopy", "fundus photography"];
    const LETTERS: [&str; 5] = ["A", "B", "C", "D", "E"];
    const SUFFIX: &str = "First think about the reasoning process in the mind and then provide the user with the \
        answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, \
        respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>";

    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    for (si, shape) in SHAPES.iter().enumerate() {
        for (ci, colour) in COLOURS.iter().enumerate() {
            let pos = POSITIONS[(si + ci) % POSITIONS.len()];
            let n = (si * 3 + ci) % NUMBERS.len();
            let letter = LETTERS[(si + 2 * ci) % LETTERS.len()];
            line(format!("What colour is the {shape} in the {pos} of the image?"));
            line(format!("What shape is in the {pos}? Answer with a single word."));
            line(format!("How many {colour} {shape}s are there in the picture?"));
            line(format!("Is the {colour} {shape} on the left or the right side?"));
            line(format!(
                "<think>The image shows {} {colour} {shape}s. The largest one is in the {pos}.</think><answer>{}</answer>",
                NUMBERS[n], n
            ));
            line(format!(
                "Which option is correct? A. {} B. {} C. {} D. {} E. none of the above",
                SHAPES[(si + 1) % 8],
                COLOURS[(ci + 2) % 9],
                shape,
                POSITIONS[(ci + 4) % 9]
            ));
            line(format!(
                "<think>Option {letter} matches the {colour} {shape}.</think><answer>{letter}</answer>"
            ));
        }
    }
    for (mi, word) in MEDICAL.iter().enumerate() {
        let modality = MODALITIES[mi % MODALITIES.len()];
        let letter = LETTERS[mi % LETTERS.len()];
        line(format!(
            "Is there evidence of {word} in this {modality} image? {SUFFIX}"
        ));
        line(format!(
            "Which organ is shown in this {modality} scan? A. {word} B. {} C. normal D. abnormal",
            MEDICAL[(mi + 7) % 36]
        ));
        line(format!(
            "<think>The {modality} image of the patient shows a {word}. The findings are consistent with the diagnosis.</think><answer>{letter}</answer>"
        ));
        line(format!(
            "Question: What abnormality is seen in the {word}? Answer: {}",
            MEDICAL[(mi + 11) % 36]
        ));
    }
    for n in 0..100 {
        line(format!(
            "There are {n} objects; the answer is {} ({}).",
            n % 10,
            NUMBERS[n % 10]
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn deterministic_and_sized() {
        let a = TinyTokenizer::build().unwrap();
        let b = TinyTokenizer::build().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.ids.vocab_size, TINY_VOCAB_SIZE);
        assert_eq!(a.ids.endoftext as usize, BPE_VOCAB_SIZE);
        let ids = [
            a.ids.endoftext,
            a.ids.im_start,
            a.ids.im_end,
            a.ids.vision_start,
            a.ids.vision_end,
            a.ids.vision_pad,
            a.ids.image_pad,
            a.ids.video_pad,
        ];
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
        let dir = tempfile::tempdir().unwrap();
        let written = write_tiny_tokenizer(dir.path()).unwrap();
        assert_eq!(written, a.ids);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap(),
            a.tokenizer_json
        );
    }

    #[test]
    fn special_and_tag_tokens_are_single() {
        let t = TinyTokenizer::build().unwrap();
        let tok = t.tokenizer().unwrap();
        for s in SPECIAL_TOKENS.iter().chain(TAG_TOKENS.iter()) {
            let enc = tok.encode(*s, false).unwrap();
            assert_eq!(enc.get_ids().len(), 1, "{s}");
        }
        let decoded = tok.decode(&[t.ids.im_start, t.ids.im_end], true).unwrap();
        assert_eq!(decoded, "");
        let think = tok.token_to_id("<think>").unwrap();
        assert_eq!(tok.decode(&[think], true).unwrap(), "<think>");
    }

    #[test]
    fn merges_compress_corpus_text() {
        let tok = TinyTokenizer::build().unwrap().tokenizer().unwrap();
        let text = "What colour is the red circle in the top left of the image?";
        let n = tok.encode(text, false).unwrap().get_ids().len();
        assert!(n < text.len() / 2, "{n} tokens for {} bytes", text.len());
        // Any bytes still encode (byte-level) and round-trip.
        let odd = "\u{0}\t\r\n 東京 🙂 ÿ";
        let ids = tok.encode(odd, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), odd);
    }

    #[test]
    fn config_names_tokens_and_template() {
        let t = TinyTokenizer::build().unwrap();
        let cfg: Value = serde_json::from_str(&t.tokenizer_config_json).unwrap();
        assert_eq!(cfg["eos_token"], "<|im_end|>");
        assert_eq!(cfg["pad_token"], "<|endoftext|>");
        assert_eq!(cfg["chat_template"], DEFAULT_CHAT_TEMPLATE);
        assert_eq!(
            cfg["added_tokens_decoder"][t.ids.image_pad.to_string()]["content"],
            "<|image_pad|>"
        );
    }
}
