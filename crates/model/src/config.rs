//! Model configuration from a Hugging Face `config.json`, in both layouts transformers writes:
//! 4.x (flat text fields, `rope_theta` + `rope_scaling`, as OctoMed-7B ships) and 5.x (nested
//! `text_config` / `vision_config`, `rope_parameters`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The text decoder's hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Split of the rotary half-dimension between the t, h and w axes.
    pub mrope_section: Vec<usize>,
    pub max_position_embeddings: usize,
}

/// The vision tower's hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub out_hidden_size: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub in_channels: usize,
    /// Attention window side in pixels.
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub rope_theta: f64,
}

impl VisionConfig {
    /// Per-head dimension of the vision attention.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Length of one flattened patch row: C x T x p x p.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Window side in merged tokens (112 px -> 4 for the released models).
    pub fn merged_window_side(&self) -> usize {
        self.window_size / self.spatial_merge_size / self.patch_size
    }

    /// Number of patches merged into one language-model token.
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

/// A whole Qwen2.5-VL configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tie_word_embeddings: bool,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation (`eos_token_id` may be one id or a list).
    pub eos_token_ids: Vec<u32>,
    /// The file as read, kept so a saved checkpoint carries every original key.
    pub raw: Value,
}

/// Reads typed fields out of one JSON object, naming the file and the dotted field on error.
struct Fields<'a> {
    path: &'a Path,
    prefix: String,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_string() } else { format!("{}.{key}", self.prefix) }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| Error::config(self.path, self.name(key), format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| Error::config(self.path, self.name(key), "missing; expected a non-negative integer"))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::config(self.path, self.name(key), format!("expected a number, found {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::config(self.path, self.name(key), format!("expected true or false, found {v}"))),
        }
    }

    fn usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let bad = || Error::config(self.path, self.name(key), format!("expected a list of non-negative integers, found {v}"));
        let list = v.as_array().ok_or_else(bad)?;
        list.iter().map(|x| x.as_u64().map(|n| n as usize).ok_or_else(bad)).collect::<Result<Vec<_>>>().map(Some)
    }

    fn object(&self, key: &str) -> Result<Option<Fields<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(obj)) => Ok(Some(Fields { path: self.path, prefix: self.name(key), obj })),
            Some(v) => Err(Error::config(self.path, self.name(key), format!("expected an object, found {v}"))),
        }
    }
}

impl Config {
    /// Image, video and vision-start placeholders: never text, so never sampled into a completion
    /// and refused in one (a forward pass over it would read them as image slots).
    pub fn placeholder_token_ids(&self) -> [u32; 3] {
        [self.image_token_id, self.video_token_id, self.vision_start_token_id]
    }

    /// Reads `config.json` from a model directory.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text, &path)
    }

    /// Parses a config from JSON text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: Value = serde_json::from_str(text).map_err(|source| Error::Json { path: path.to_path_buf(), cause: source })?;
        Self::from_value(raw, path)
    }

    /// Parses a config already read as JSON.
    pub fn from_value(raw: Value, path: &Path) -> Result<Self> {
        let Some(obj) = raw.as_object() else {
            return Err(Error::config(path, "(top level)", "expected a JSON object"));
        };
        let top = Fields { path, prefix: String::new(), obj };
        let nested = top.object("text_config")?;
        // 5.x keeps text fields in text_config; 4.x keeps them at the top level.
        let text_fields = nested.as_ref().unwrap_or(&top);
        let vision_fields = top
            .object("vision_config")?
            .ok_or_else(|| Error::config(path, "vision_config", "missing; expected the vision tower's settings"))?;

        let text = read_text(text_fields, &top)?;
        let vision = read_vision(&vision_fields, text.hidden_size)?;

        // Token ids live at the top level in 4.x; look in text_config too, as 5.x may move them.
        let token = |key: &str| -> Result<Option<u32>> {
            let v = match top.usize_opt(key)? {
                Some(v) => Some(v),
                None => match &nested { Some(n) => n.usize_opt(key)?, None => None },
            };
            Ok(v.map(|v| v as u32))
        };
        let required = |key: &str| -> Result<u32> {
            token(key)?.ok_or_else(|| Error::config(path, key, "missing; expected a token id"))
        };
        let eos_token_ids = read_eos(&top, nested.as_ref())?;
        let tie_word_embeddings = match top.get("tie_word_embeddings") {
            Some(_) => top.bool_or("tie_word_embeddings", false)?,
            None => text_fields.bool_or("tie_word_embeddings", false)?,
        };
        let config = Config {
            text,
            vision,
            tie_word_embeddings,
            image_token_id: required("image_token_id")?,
            video_token_id: required("video_token_id")?,
            vision_start_token_id: required("vision_start_token_id")?,
            vision_end_token_id: token("vision_end_token_id")?.unwrap_or(0),
            bos_token_id: token("bos_token_id")?,
            eos_token_ids,
            raw: raw.clone(),
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let t = &self.text;
        let v = &self.vision;
        // Name text fields where the file keeps them: nested in 5.x, top level in 4.x.
        let text_prefix = if self.raw.get("text_config").is_some() { "text_config." } else { "" };
        let check = |ok: bool, field: &str, expected: String| {
            let field = if field.starts_with("vision_config") || field.ends_with("token_id") { field.to_string() } else { format!("{text_prefix}{field}") };
            if ok { Ok(()) } else { Err(Error::config(path, field, expected)) }
        };
        check(t.num_attention_heads > 0 && t.num_key_value_heads > 0, "num_key_value_heads", "expected positive head counts".into())?;
        check(
            t.num_attention_heads.is_multiple_of(t.num_key_value_heads),
            "num_key_value_heads",
            format!("expected a divisor of num_attention_heads = {}, found {}", t.num_attention_heads, t.num_key_value_heads),
        )?;
        check(
            t.mrope_section.len() == 3 && t.mrope_section.iter().sum::<usize>() * 2 == t.head_dim,
            "mrope_section",
            format!("expected three sections summing to head_dim / 2 = {}, found {:?}", t.head_dim / 2, t.mrope_section),
        )?;
        check(t.vocab_size > 0 && t.hidden_size > 0 && t.num_hidden_layers > 0, "hidden_size", "expected positive sizes".into())?;
        check(v.num_heads > 0 && v.hidden_size.is_multiple_of(v.num_heads), "vision_config.num_heads", format!("expected a divisor of vision hidden_size {}", v.hidden_size))?;
        check(v.head_dim().is_multiple_of(4), "vision_config.hidden_size", "expected a vision head_dim divisible by 4 (2-D rotary)".into())?;
        check(
            v.out_hidden_size == t.hidden_size,
            "vision_config.out_hidden_size",
            format!("expected the text hidden_size {}, found {}", t.hidden_size, v.out_hidden_size),
        )?;
        check(v.patch_size > 0 && v.spatial_merge_size > 0 && v.temporal_patch_size > 0, "vision_config.patch_size", "expected positive patch sizes".into())?;
        check(
            v.window_size.is_multiple_of(v.patch_size * v.spatial_merge_size) && v.merged_window_side() > 0,
            "vision_config.window_size",
            format!("expected a positive multiple of patch_size x spatial_merge_size = {}", v.patch_size * v.spatial_merge_size),
        )?;
        if let Some(bad) = v.fullatt_block_indexes.iter().find(|&&i| i >= v.depth) {
            return Err(Error::config(path, "vision_config.fullatt_block_indexes", format!("expected indexes below depth {}, found {bad}", v.depth)));
        }
        for (field, id) in [("image_token_id", self.image_token_id), ("video_token_id", self.video_token_id), ("vision_start_token_id", self.vision_start_token_id)] {
            check((id as usize) < t.vocab_size, field, format!("expected an id below vocab_size {}, found {id}", t.vocab_size))?;
        }
        Ok(())
    }

}

fn read_text(f: &Fields<'_>, top: &Fields<'_>) -> Result<TextConfig> {
    let hidden_size = f.usize("hidden_size")?;
    let num_attention_heads = f.usize("num_attention_heads")?;
    let head_dim = match f.usize_opt("head_dim")? {
        Some(d) => d,
        None if num_attention_heads > 0 => hidden_size / num_attention_heads,
        None => 0,
    };
    // 5.x: rope_parameters {rope_theta, mrope_section}; 4.x: rope_theta + rope_scaling {type, mrope_section}.
    let rope_params = match f.object("rope_parameters")? {
        Some(p) => Some(p),
        None => top.object("rope_parameters")?,
    };
    let rope_scaling = match f.object("rope_scaling")? {
        Some(p) => Some(p),
        None => top.object("rope_scaling")?,
    };
    let rope_theta = match rope_params.as_ref().map(|p| p.f64_opt("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => f.f64_opt("rope_theta")?.or(top.f64_opt("rope_theta")?).unwrap_or(1_000_000.0),
    };
    let mrope_section = match rope_params.as_ref().map(|p| p.usize_list("mrope_section")).transpose()?.flatten() {
        Some(s) => s,
        None => match rope_scaling.as_ref().map(|p| p.usize_list("mrope_section")).transpose()?.flatten() {
            Some(s) => s,
            None => return Err(Error::config(f.path, f.name("rope_scaling.mrope_section"), "missing; expected three M-RoPE sections (rope_parameters.mrope_section in 5.x)")),
        },
    };
    if let Some(scaling) = &rope_scaling
        && let Some(kind) = scaling.get("type").or_else(|| scaling.get("rope_type"))
        && !matches!(kind.as_str(), Some("mrope" | "default"))
    {
        return Err(Error::config(f.path, scaling.name("type"), format!("expected \"mrope\" or \"default\", found {kind}")));
    }
    if let Some(act) = f.get("hidden_act")
        && act.as_str() != Some("silu")
    {
        return Err(Error::config(f.path, f.name("hidden_act"), format!("expected \"silu\", found {act}")));
    }
    Ok(TextConfig {
        vocab_size: f.usize("vocab_size")?,
        hidden_size,
        intermediate_size: f.usize("intermediate_size")?,
        num_hidden_layers: f.usize("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads: f.usize_or("num_key_value_heads", num_attention_heads)?,
        head_dim,
        rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        mrope_section,
        max_position_embeddings: f.usize_or("max_position_embeddings", 128_000)?,
    })
}

fn read_vision(f: &Fields<'_>, text_hidden: usize) -> Result<VisionConfig> {
    let patch_size = match f.usize_opt("patch_size")? {
        Some(p) => p,
        None => f.usize_or("spatial_patch_size", 14)?,
    };
    let rope_theta = match f.object("rope_parameters")? {
        Some(p) => p.f64_opt("rope_theta")?.unwrap_or(10_000.0),
        None => 10_000.0,
    };
    if let Some(act) = f.get("hidden_act")
        && act.as_str() != Some("silu")
    {
        return Err(Error::config(f.path, f.name("hidden_act"), format!("expected \"silu\", found {act}")));
    }
    Ok(VisionConfig {
        depth: f.usize("depth")?,
        hidden_size: f.usize("hidden_size")?,
        intermediate_size: f.usize("intermediate_size")?,
        num_heads: f.usize("num_heads")?,
        out_hidden_size: f.usize_or("out_hidden_size", text_hidden)?,
        patch_size,
        spatial_merge_size: f.usize_or("spatial_merge_size", 2)?,
        temporal_patch_size: f.usize_or("temporal_patch_size", 2)?,
        in_channels: match f.usize_opt("in_chans")? {
            Some(c) => c,
            None => f.usize_or("in_channels", 3)?,
        },
        window_size: f.usize_or("window_size", 112)?,
        fullatt_block_indexes: f.usize_list("fullatt_block_indexes")?.unwrap_or_default(),
        rope_theta,
    })
}

fn read_eos(top: &Fields<'_>, nested: Option<&Fields<'_>>) -> Result<Vec<u32>> {
    let value = top.get("eos_token_id").or_else(|| nested.and_then(|n| n.get("eos_token_id")));
    match value {
        None => Ok(Vec::new()),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|id| vec![id as u32])
            .ok_or_else(|| Error::config(top.path, "eos_token_id", format!("expected a token id, found {n}"))),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_u64().map(|id| id as u32).ok_or_else(|| Error::config(top.path, "eos_token_id", format!("expected token ids, found {v}"))))
            .collect(),
        Some(v) => Err(Error::config(top.path, "eos_token_id", format!("expected a token id or a list of ids, found {v}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_7b() -> Value {
        serde_json::json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "max_position_embeddings": 128000, "vocab_size": 152064, "tie_word_embeddings": false,
            "bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655, "video_token_id": 151656,
            "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
            "hidden_act": "silu", "torch_dtype": "bfloat16",
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                "hidden_act": "silu", "in_chans": 3}
        })
    }

    fn v5_3b() -> Value {
        serde_json::json!({
            "model_type": "qwen2_5_vl", "tie_word_embeddings": true,
            "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "text_config": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                "eos_token_id": 151645, "bos_token_id": 151643},
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}
        })
    }

    fn parse(v: Value) -> Result<Config> {
        Config::from_value(v, Path::new("model/config.json"))
    }

    #[test]
    fn reads_the_4x_layout_of_the_7b_model() {
        let c = parse(v4_7b()).expect("valid");
        assert_eq!(c.text.hidden_size, 3584);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.num_key_value_heads, 4);
        assert_eq!(c.text.mrope_section, vec![16, 24, 24]);
        assert_eq!(c.text.rope_theta, 1e6);
        assert_eq!(c.vision.head_dim(), 80);
        assert_eq!(c.vision.merged_window_side(), 4);
        assert_eq!(c.vision.patch_dim(), 1176);
        assert_eq!(c.eos_token_ids, vec![151645]);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn reads_the_5x_nested_layout_of_the_3b_model() {
        let c = parse(v5_3b()).expect("valid");
        assert_eq!(c.text.hidden_size, 2048);
        assert_eq!(c.text.num_hidden_layers, 36);
        assert_eq!(c.text.mrope_section, vec![16, 24, 24]);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![151645]);
        assert_eq!(c.bos_token_id, Some(151643));
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let mut v = v4_7b();
        v["num_key_value_heads"] = serde_json::json!("four");
        let msg = parse(v).expect_err("bad type").to_string();
        assert!(msg.contains("model/config.json") && msg.contains("num_key_value_heads"), "{msg}");

        let mut v = v5_3b();
        v["text_config"].as_object_mut().expect("object").remove("hidden_size");
        let msg = parse(v).expect_err("missing").to_string();
        assert!(msg.contains("text_config.hidden_size") && msg.contains("missing"), "{msg}");

        let mut v = v4_7b();
        v["rope_scaling"]["mrope_section"] = serde_json::json!([16, 24, 16]);
        let msg = parse(v).expect_err("bad sections").to_string();
        assert!(msg.contains("mrope_section"), "{msg}");

        let mut v = v4_7b();
        v["vision_config"]["out_hidden_size"] = serde_json::json!(2048);
        assert!(parse(v).expect_err("mismatch").to_string().contains("vision_config.out_hidden_size"));

        let msg = Config::from_json_str("{not json", Path::new("x/config.json")).expect_err("json").to_string();
        assert!(msg.contains("x/config.json"), "{msg}");
    }
}
