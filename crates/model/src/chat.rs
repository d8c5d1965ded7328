//! Tokenizer, chat template and prompt encoding, matching what the transformers Qwen2.5-VL
//! processor produces: render the Jinja chat template, tokenise, expand each `<|image_pad|>`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, ErrorKind, Value as JinjaValue};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// The Qwen2-VL / Qwen2.5-VL chat template, used when a model directory carries none.
pub const DEFAULT_CHAT_TEMPLATE: &str = include_str!("../assets/qwen2_vl_chat_template.jinja");
/// Placeholder expanded to one token per merged image patch.
pub const IMAGE_PAD: &str = "<|image_pad|>";
/// End of a chat turn; the usual stop token.
pub const IM_END: &str = "<|im_end|>";
/// End of document; also a stop token.
pub const ENDOFTEXT: &str = "<|endoftext|>";

// tokenizer_config.json keys that transformers passes to the template (its special_tokens_map).
const TEMPLATE_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];
const TEMPLATE_NAME: &str = "chat_template";

/// One piece of a chat turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// An image; rendered by the Qwen template as `<|vision_start|><|image_pad|><|vision_end|>`.
    Image,
    /// Plain text.
    Text(String),
}

/// One chat turn: a role (`system`, `user`, `assistant`) and its content parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Content in order.
    pub parts: Vec<Part>,
}

impl Message {
    /// A message with any role and parts.
    pub fn new(role: impl Into<String>, parts: Vec<Part>) -> Self {
        Message {
            role: role.into(),
            parts,
        }
    }

    /// A system message with one text part.
    pub fn system(text: impl Into<String>) -> Self {
        Self::new("system", vec![Part::Text(text.into())])
    }

    /// A user message with the given parts.
    pub fn user(parts: Vec<Part>) -> Self {
        Self::new("user", parts)
    }

    /// A user message: one image followed by the question text (the VQA prompt shape).
    pub fn user_image_text(text: impl Into<String>) -> Self {
        Self::user(vec![Part::Image, Part::Text(text.into())])
    }

    /// An assistant message with one text part.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self::new("assistant", vec![Part::Text(text.into())])
    }

    /// Number of image parts.
    pub fn image_count(&self) -> usize {
        self.parts.iter().filter(|p| matches!(p, Part::Image)).count()
    }
}

// HF's content-list format: {"type": "image"} / {"type": "text", "text": ...}.
impl Serialize for Part {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Part::Image => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("type", "image")?;
                m.end()
            }
            Part::Text(t) => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("type", "text")?;
                m.serialize_entry("text", t)?;
                m.end()
            }
        }
    }
}

impl Serialize for Message {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        struct Content<'a>(&'a [Part]);
        impl Serialize for Content<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for p in self.0 {
                    seq.serialize_element(p)?;
                }
                seq.end()
            }
        }
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("role", &self.role)?;
        m.serialize_entry("content", &Content(&self.parts))?;
        m.end()
    }
}

/// Where the chat template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// A file in the model directory.
    File(PathBuf),
    /// The bundled Qwen2-VL template.
    Bundled,
    /// Given directly by the caller.
    Given,
}

/// Tokenizer plus chat template: turns chat messages into model input ids and ids back into text.
pub struct PromptEncoder {
    tokenizer: Tokenizer,
    env: Environment<'static>,
    template: String,
    template_source: TemplateSource,
    template_vars: BTreeMap<String, String>,
    image_pad_id: Option<u32>,
    tokenizer_path: PathBuf,
}

impl std::fmt::Debug for PromptEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptEncoder")
            .field("tokenizer_path", &self.tokenizer_path)
            .field("vocab_size", &self.vocab_size())
            .field("template_source", &self.template_source)
            .field("template_vars", &self.template_vars)
            .finish()
    }
}

impl PromptEncoder {
    /// Loads `tokenizer.json` and the chat template from a model directory.
    ///
    /// The template is the first found of `chat_template.jinja`, `chat_template.json`
    /// (`{"chat_template": ...}`), `tokenizer_config.json`'s `chat_template` (a string, or a list
    /// of `{name, template}` from which "default" is taken), else the bundled Qwen2-VL template.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let tok_path = model_dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
        let tokenizer = parse_tokenizer(&text, &tok_path)?;

        let cfg_path = model_dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            let t = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let v: Value = serde_json::from_str(&t).map_err(|e| Error::Json {
                path: cfg_path.clone(),
                cause: e,
            })?;
            if !v.is_object() {
                return Err(Error::config(&cfg_path, "<root>", "a JSON object"));
            }
            Some(v)
        } else {
            None
        };

        let (template, source) = find_template(model_dir, cfg.as_ref(), &cfg_path)?;
        let mut enc = Self::new(tokenizer, template)?;
        enc.template_source = source;
        enc.tokenizer_path = tok_path;
        if let Some(cfg) = &cfg {
            for key in TEMPLATE_TOKEN_KEYS {
                if let Some(tok) = special_token_text(cfg.get(key), &cfg_path, key)? {
                    enc.template_vars.insert(key.to_string(), tok);
                }
            }
        }
        Ok(enc)
    }

    /// Wraps an already-loaded tokenizer and a chat template source.
    pub fn new(mut tokenizer: Tokenizer, chat_template: impl Into<String>) -> Result<Self> {
        // A tokenizer.json may carry truncation or padding settings; prompts must come out whole
        // and unpadded, as the processor's tokenizer call (no truncation) produces them.
        tokenizer.with_truncation(None).map_err(|e| Error::Tokenizer {
            path: "<tokenizer>".into(),
            problem: e.to_string(),
        })?;
        tokenizer.with_padding(None);
        let template = chat_template.into();
        let env = build_env(&template)?;
        let image_pad_id = tokenizer.token_to_id(IMAGE_PAD);
        Ok(PromptEncoder {
            tokenizer,
            env,
            template,
            template_source: TemplateSource::Given,
            template_vars: BTreeMap::new(),
            image_pad_id,
            tokenizer_path: PathBuf::from("<tokenizer>"),
        })
    }

    /// Sets a string variable visible to the template (e.g. `bos_token`), replacing any previous value.
    pub fn set_template_var(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.template_vars.insert(name.into(), value.into());
    }

    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template source text.
    pub fn chat_template(&self) -> &str {
        &self.template
    }

    /// Where the chat template came from.
    pub fn template_source(&self) -> &TemplateSource {
        &self.template_source
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Id of `<|image_pad|>`, if the tokenizer has it.
    pub fn image_pad_id(&self) -> Option<u32> {
        self.image_pad_id
    }

    /// Renders the chat template as transformers' `apply_chat_template(..., tokenize=False)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = serde_json::Map::new();
        for (k, v) in &self.template_vars {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?,
        );
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        // transformers passes these explicitly as None, so `tools is none` holds in templates.
        ctx.insert("tools".into(), Value::Null);
        ctx.insert("documents".into(), Value::Null);
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(template_err)?;
        tmpl.render(Serde(&ctx)).map_err(template_err)
    }

    /// Renders, tokenises with special tokens (as the processor does), then expands the i-th
    /// `<|image_pad|>` to `image_token_counts[i]` copies.
    ///
    /// Errors when the number of `<|image_pad|>` tokens differs from `image_token_counts.len()`,
    /// which includes a user text that spells out `<|image_pad|>` itself.
    pub fn encode_prompt(
        &self,
        messages: &[Message],
        image_token_counts: &[usize],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.render(messages, add_generation_prompt)?;
        let ids = self.encode_text(&text, true)?;
        self.expand_image_pads(&ids, image_token_counts)
    }

    /// Expands each `<|image_pad|>` id in `ids` to the matching count, in order.
    pub fn expand_image_pads(&self, ids: &[u32], image_token_counts: &[usize]) -> Result<Vec<u32>> {
        let found = match self.image_pad_id {
            Some(pad) => ids.iter().filter(|&&i| i == pad).count(),
            None => 0,
        };
        if found != image_token_counts.len() {
            return Err(Error::Input(format!(
                "prompt has {found} {IMAGE_PAD} placeholder(s) but {} image token count(s) were given",
                image_token_counts.len()
            )));
        }
        let Some(pad) = self.image_pad_id else {
            return Ok(ids.to_vec());
        };
        // Counts come from callers; refuse totals that could not be a real prompt instead of overflowing.
        let total = image_token_counts
            .iter()
            .try_fold(ids.len(), |acc, &c| acc.checked_add(c))
            .filter(|&t| t <= u32::MAX as usize)
            .ok_or_else(|| Error::Input(format!("image token counts {image_token_counts:?} are too large")))?;
        let mut out = Vec::with_capacity(total);
        let mut counts = image_token_counts.iter();
        for &id in ids {
            if id == pad {
                let n = counts.next().copied().unwrap_or(1);
                out.extend(std::iter::repeat_n(pad, n));
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Tokenises completion text without special tokens (for scoring a model's answer).
    pub fn encode_completion(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_text(text, false)
    }

    /// Tokenises arbitrary text, optionally applying the tokenizer's post-processor.
    pub fn encode_text(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| self.tok_err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; ids the tokenizer does not know (e.g. from a padded embedding matrix) are skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let known: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| self.tokenizer.id_to_token(i).is_some())
            .collect();
        self.tokenizer
            .decode(&known, skip_special_tokens)
            .map_err(|e| self.tok_err(e))
    }

    /// Id of a token (regular or added), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Ids that end generation: `<|im_end|>`, `<|endoftext|>` and the config's `eos_token`, where present.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let eos = self.template_vars.get("eos_token").map(String::as_str);
        for tok in [Some(IM_END), Some(ENDOFTEXT), eos].into_iter().flatten() {
            if let Some(id) = self.tokenizer.token_to_id(tok)
                && !out.contains(&id)
            {
                out.push(id);
            }
        }
        out
    }

    fn tok_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.tokenizer_path.clone(),
            problem: e.to_string(),
        }
    }
}

fn parse_tokenizer(text: &str, path: &Path) -> Result<Tokenizer> {
    text.parse::<Tokenizer>().map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })
}

fn template_err(e: minijinja::Error) -> Error {
    // minijinja nests the underlying cause (e.g. a raise_exception message) as the error source.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::Template(msg)
}

fn find_template(model_dir: &Path, cfg: Option<&Value>, cfg_path: &Path) -> Result<(String, TemplateSource)> {
    let jinja = model_dir.join("chat_template.jinja");
    if jinja.is_file() {
        let t = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
        return Ok((t, TemplateSource::File(jinja)));
    }
    let json_path = model_dir.join("chat_template.json");
    if json_path.is_file() {
        let t = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
        let v: Value = serde_json::from_str(&t).map_err(|e| Error::Json {
            path: json_path.clone(),
            cause: e,
        })?;
        let field = v.get("chat_template");
        return match template_from_field(field, &json_path)? {
            Some(t) => Ok((t, TemplateSource::File(json_path))),
            None => Err(Error::config(&json_path, "chat_template", "a template string")),
        };
    }
    if let Some(cfg) = cfg
        && let Some(t) = template_from_field(cfg.get("chat_template"), cfg_path)?
    {
        return Ok((t, TemplateSource::File(cfg_path.to_path_buf())));
    }
    Ok((DEFAULT_CHAT_TEMPLATE.to_string(), TemplateSource::Bundled))
}

// A template field is a string, or a list of {name, template} (HF's named templates).
fn template_from_field(field: Option<&Value>, path: &Path) -> Result<Option<String>> {
    match field {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let expected = "a list of {name, template} objects with a \"default\" entry";
            for item in list {
                let name = item.get("name").and_then(Value::as_str);
                let tmpl = item.get("template").and_then(Value::as_str);
                match (name, tmpl) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(_), Some(_)) => {}
                    _ => return Err(Error::config(path, "chat_template", expected)),
                }
            }
            Err(Error::config(path, "chat_template", expected))
        }
        Some(_) => Err(Error::config(
            path,
            "chat_template",
            "a string or a list of {name, template}",
        )),
    }
}

// Special tokens appear as plain strings or as serialised AddedToken objects with a `content` key.
fn special_token_text(v: Option<&Value>, path: &Path, key: &str) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::config(
                path,
                key,
                "a string or an object with a string `content`",
            )),
        },
        Some(_) => Err(Error::config(
            path,
            key,
            "a string or an object with a string `content`",
        )),
    }
}

// The same environment transformers builds: trim_blocks + lstrip_blocks, loop controls, a
// `raise_exception` global and a `tojson` that does not HTML-escape; Python string methods via pycompat.
fn build_env(template: &str) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(template_err)?;
    env.set_syntax(syntax);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JinjaValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_filter("tojson", hf_tojson);
    env.add_template_owned(TEMPLATE_NAME, template.to_string())
        .map_err(template_err)?;
    Ok(env)
}

// Python's json.dumps layout: ", " and ": " separators when compact, "," plus newlines when indented.
struct PyJsonFormatter {
    indent: Option<Vec<u8>>,
    depth: usize,
    has_value: bool,
}

impl PyJsonFormatter {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(ind) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.depth {
                w.write_all(ind)?;
            }
        }
        Ok(())
    }
}

impl serde_json::ser::Formatter for PyJsonFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(if self.indent.is_some() { b"," } else { b", " })?;
        }
        self.newline(w)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(if self.indent.is_some() { b"," } else { b", " })?;
        }
        self.newline(w)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

// HF's override of `tojson`: json.dumps(x, ensure_ascii=False, indent=None, sort_keys=False).
// Map keys come out sorted either way, because minijinja stores maps ordered.
fn hf_tojson(value: JinjaValue, kwargs: Kwargs) -> std::result::Result<JinjaValue, minijinja::Error> {
    let indent: Option<JinjaValue> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let _sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.as_bytes().to_vec())
            } else {
                let n = usize::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an integer or string",
                    )
                })?;
                Some(vec![b' '; n.min(64)])
            }
        }
    };
    let mut out = Vec::new();
    let fmt = PyJsonFormatter {
        indent,
        depth: 0,
        has_value: false,
    };
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    value
        .serialize(&mut ser)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let s = String::from_utf8(out)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if ensure_ascii == Some(true) {
        let mut esc = String::with_capacity(s.len());
        for ch in s.chars() {
            if ch.is_ascii() {
                esc.push(ch);
            } else {
                let mut buf = [0u16; 2];
                for unit in ch.encode_utf16(&mut buf) {
                    esc.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        return Ok(JinjaValue::from(esc));
    }
    Ok(JinjaValue::from(s))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tiny_tokenizer::TinyTokenizer;

    fn tiny_dir() -> (tempfile::TempDir, PromptEncoder) {
        let dir = tempfile::tempdir().unwrap();
        TinyTokenizer::build().unwrap().write(dir.path()).unwrap();
        let enc = PromptEncoder::load(dir.path()).unwrap();
        (dir, enc)
    }

    const SECTION8: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n<|im_start|>assistant\n";

    #[test]
    fn renders_reference_string_exactly() {
        let (_d, enc) = tiny_dir();
        let msgs = [Message::user_image_text("What is shown?")];
        assert_eq!(enc.render(&msgs, true).unwrap(), SECTION8);
        // Without the generation prompt the text stops after the user's <|im_end|>\n.
        let no_gen = enc.render(&msgs, false).unwrap();
        assert_eq!(no_gen, SECTION8.strip_suffix("<|im_start|>assistant\n").unwrap());
        // The bundled template gives the same string when a model dir has no template at all.
        let tok = enc.tokenizer().clone();
        let bundled = PromptEncoder::new(tok, DEFAULT_CHAT_TEMPLATE).unwrap();
        assert_eq!(bundled.render(&msgs, true).unwrap(), SECTION8);
    }

    #[test]
    fn system_message_and_multi_image_variants() {
        let (_d, enc) = tiny_dir();
        let msgs = [
            Message::system("Be brief."),
            Message::user(vec![
                Part::Image,
                Part::Text("Left: ".into()),
                Part::Image,
                Part::Text("Same?".into()),
            ]),
            Message::assistant("<think>x</think><answer>B</answer>"),
            Message::user(vec![Part::Text("Sure?".into())]),
        ];
        let want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Left: <|vision_start|><|image_pad|><|vision_end|>Same?<|im_end|>\n<|im_start|>assistant\n<think>x</think><answer>B</answer><|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(enc.render(&msgs, true).unwrap(), want);
    }

    #[test]
    fn pad_expansion_and_count_mismatch() {
        let (_d, enc) = tiny_dir();
        let pad = enc.image_pad_id().unwrap();
        let msgs = [Message::user(vec![
            Part::Image,
            Part::Text("a".into()),
            Part::Image,
            Part::Text("b".into()),
        ])];
        let plain = enc.encode_prompt(&msgs, &[1, 1], true).unwrap();
        let ids = enc.encode_prompt(&msgs, &[6, 24], true).unwrap();
        assert_eq!(ids.len(), plain.len() + 5 + 23);
        assert_eq!(ids.iter().filter(|&&i| i == pad).count(), 30);
        // The runs are contiguous and in order: the first pad run has 6, the second 24.
        let first = ids.iter().position(|&i| i == pad).unwrap();
        assert!(ids[first..first + 6].iter().all(|&i| i == pad));
        assert_ne!(ids[first + 6], pad);
        let second = first + 6 + ids[first + 6..].iter().position(|&i| i == pad).unwrap();
        assert!(ids[second..second + 24].iter().all(|&i| i == pad));
        assert_ne!(ids[second + 24], pad);
        // Zero count removes the placeholder.
        assert_eq!(enc.encode_prompt(&msgs, &[0, 0], true).unwrap().len(), plain.len() - 2);

        for counts in [&[][..], &[4][..], &[4, 4, 4][..]] {
            let e = enc.encode_prompt(&msgs, counts, true).unwrap_err();
            assert!(e.to_string().contains("placeholder"), "{e}");
        }
        // A user who types the pad token text gets a mismatch, not a silent misalignment.
        let sneaky = [Message::user_image_text("look <|image_pad|>")];
        assert!(enc.encode_prompt(&sneaky, &[4], true).is_err());
        assert_eq!(
            enc.encode_prompt(&sneaky, &[4, 1], true)
                .unwrap()
                .iter()
                .filter(|&&i| i == pad)
                .count(),
            5
        );
    }

    #[test]
    fn encode_decode_round_trip() {
        let (_d, enc) = tiny_dir();
        let text = "<think>The red circle is at the top left. Ünïcödé ✓ 123</think><answer>B</answer>";
        let ids = enc.encode_completion(text).unwrap();
        assert_eq!(enc.decode(&ids, false).unwrap(), text);
        assert_eq!(
            enc.decode(&ids, true).unwrap(),
            text,
            "think/answer tags are not special"
        );
        for tag in ["<think>", "</think>", "<answer>", "</answer>"] {
            let id = enc.token_id(tag).unwrap();
            assert_eq!(enc.encode_completion(tag).unwrap(), vec![id], "{tag} is one token");
        }
        let msgs = [Message::user_image_text("What is shown?")];
        let ids = enc.encode_prompt(&msgs, &[3], true).unwrap();
        let full = enc.decode(&ids, false).unwrap();
        assert_eq!(full, SECTION8.replace(IMAGE_PAD, &IMAGE_PAD.repeat(3)));
        let stripped = enc.decode(&ids, true).unwrap();
        assert_eq!(
            stripped,
            "system\nYou are a helpful assistant.\nuser\nWhat is shown?\nassistant\n"
        );
        // Out-of-vocabulary ids (a padded lm_head) are skipped, not a panic.
        let mut with_junk = ids.clone();
        with_junk.extend([enc.vocab_size() as u32, 151_000, u32::MAX]);
        assert_eq!(enc.decode(&with_junk, false).unwrap(), full);
    }

    #[test]
    fn encoder_is_shareable_and_absurd_counts_fail() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PromptEncoder>();
        let (_d, enc) = tiny_dir();
        let msgs = [Message::user_image_text("x")];
        assert!(enc.encode_prompt(&msgs, &[usize::MAX], true).is_err());
    }

    #[test]
    fn stop_tokens_and_lookups() {
        let (_d, enc) = tiny_dir();
        let im_end = enc.token_id(IM_END).unwrap();
        let eot = enc.token_id(ENDOFTEXT).unwrap();
        assert_eq!(enc.stop_token_ids(), vec![im_end, eot]);
        assert_eq!(enc.token_id("<|no such token|>"), None);
    }

    #[test]
    fn template_lookup_order() {
        let (dir, enc) = tiny_dir();
        assert_eq!(
            enc.template_source(),
            &TemplateSource::File(dir.path().join("tokenizer_config.json"))
        );
        let msgs = [Message::user(vec![Part::Text("hi".into())])];

        // A list of named templates: "default" is taken.
        let cfg_path = dir.path().join("tokenizer_config.json");
        let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["chat_template"] = serde_json::json!([
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "D{{ messages[0].content[0].text }}{{ eos_token }}"}
        ]);
        std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(
            PromptEncoder::load(dir.path()).unwrap().render(&msgs, false).unwrap(),
            "Dhi<|im_end|>"
        );

        std::fs::write(
            dir.path().join("chat_template.json"),
            r#"{"chat_template": "J{{ bos_token }}"}"#,
        )
        .unwrap();
        assert_eq!(
            PromptEncoder::load(dir.path()).unwrap().render(&msgs, false).unwrap(),
            "J"
        );

        std::fs::write(dir.path().join("chat_template.jinja"), "{{ raise_exception('nope') }}").unwrap();
        let e = PromptEncoder::load(dir.path())
            .unwrap()
            .render(&msgs, false)
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");

        // Nothing anywhere: the bundled template.
        for f in ["chat_template.jinja", "chat_template.json"] {
            std::fs::remove_file(dir.path().join(f)).unwrap();
        }
        cfg.as_object_mut().unwrap().remove("chat_template");
        std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let enc = PromptEncoder::load(dir.path()).unwrap();
        assert_eq!(enc.template_source(), &TemplateSource::Bundled);
        assert_eq!(
            enc.render(&[Message::user_image_text("What is shown?")], true).unwrap(),
            SECTION8
        );

        cfg["chat_template"] = serde_json::json!(42);
        std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let e = PromptEncoder::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("chat_template"), "{e}");
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(PromptEncoder::load(dir.path()).unwrap_err(), Error::Io { .. }));
        std::fs::write(dir.path().join("tokenizer.json"), "{\"not\": \"a tokenizer\"}").unwrap();
        assert!(matches!(
            PromptEncoder::load(dir.path()).unwrap_err(),
            Error::Tokenizer { .. }
        ));
        TinyTokenizer::build().unwrap().write(dir.path()).unwrap();
        std::fs::write(dir.path().join("chat_template.jinja"), "{% for %}").unwrap();
        assert!(matches!(
            PromptEncoder::load(dir.path()).unwrap_err(),
            Error::Template(_)
        ));
    }

    #[test]
    fn python_helpers_and_tojson() {
        let (_d, enc) = tiny_dir();
        let tok = enc.tokenizer().clone();
        let t = "{{ messages[0].content[0].text.strip().upper() }}|{{ messages | tojson }}|{{ {'b': [1, 2], 'a': 'é<'} | tojson(indent=1) }}";
        let e = PromptEncoder::new(tok, t).unwrap();
        let out = e
            .render(&[Message::user(vec![Part::Text("  hi ".into())])], false)
            .unwrap();
        assert_eq!(
            out,
            "HI|[{\"content\": [{\"text\": \"  hi \", \"type\": \"text\"}], \"role\": \"user\"}]|{\n \"a\": \"é<\",\n \"b\": [\n  1,\n  2\n ]\n}"
        );
    }
}
