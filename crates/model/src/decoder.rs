//! The Qwen2 text decoder: embeddings, M-RoPE attention with grouped KV heads, SwiGLU MLP, the
//! final norm and the LM head, with a KV cache for generation.

use candle_core::{D, Tensor};

use crate::config::TextConfig;
use crate::group_cache::GroupCache;
use crate::nn::{Exec, Linear, attention, rms_norm};
use crate::rope::Rotary;
use crate::weights::Weights;
use crate::{Error, Result};

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    inputs: Projections,
    o: Linear,
    down: Linear,
}

/// The projections that read a layer's normed hidden states.
enum Projections {
    /// As loaded: one [`Linear`] per HF module, each trainable and adaptable on its own.
    Separate { q: Linear, k: Linear, v: Linear, gate: Linear, up: Linear },
    /// One matmul for q/k/v and one for gate/up, for inference (see [`TextModel::fuse_projections`]).
    Fused { qkv: Stacked, gate_up: Stacked },
}

/// Linear layers that read the same input, run as one matmul over their weights stacked by rows.
struct Stacked {
    /// The stacked weights `[Σ out, in]`, without bias.
    linear: Linear,
    /// Output width and bias of each part, in order.
    parts: Vec<(usize, Option<Tensor>)>,
}

impl Stacked {
    /// Why `l` cannot join a stack, if it cannot: an adapter would be dropped, and a trainable
    /// weight would stay alive (and keep training) in the stacked copy's graph.
    fn refusal(l: &Linear) -> Option<&'static str> {
        if l.lora.is_some() {
            Some("has a LoRA adapter")
        } else if l.weight.track_op() || l.bias.as_ref().is_some_and(Tensor::track_op) {
            Some("is trainable")
        } else {
            None
        }
    }

    /// Stacks layers that [`Self::refusal`] accepts.
    fn new(layers: &[&Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let parts = layers.iter().map(|l| Ok((l.weight.dim(0)?, l.bias.clone()))).collect::<Result<Vec<_>>>()?;
        Ok(Stacked { linear: Linear::new(Tensor::cat(&weights, 0)?, None), parts })
    }

    /// Each part's output over the last dimension of `x`. A part with a bias comes back
    /// contiguous (the bias add writes it out); one without is a strided view of the whole output.
    fn forward<const N: usize>(&self, x: &Tensor) -> Result<[Tensor; N]> {
        let y = self.linear.forward(x)?;
        let mut start = 0;
        let mut outs = Vec::with_capacity(N);
        for (width, bias) in &self.parts {
            let part = y.narrow(D::Minus1, start, *width)?;
            start += width;
            // Biases are added per part, not once over `y`: the add then also does the copy that
            // the narrowed (strided) part would need before rope or the KV cache write.
            outs.push(match bias {
                Some(b) => part.broadcast_add(&b.to_dtype(part.dtype())?)?,
                None => part,
            });
        }
        let got = outs.len();
        outs.try_into().map_err(|_| Error::Input(format!("{got} stacked projections where {N} were expected")))
    }
}

/// Keys and values of every layer after a prefill, `[B, Hkv, T, D]` each.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    /// Cached length (including left padding).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Left-pads the cache with zeros to `len` positions (masked by the caller).
    pub fn left_pad(&self, len: usize) -> Result<KvCache> {
        let cur = self.len();
        if cur >= len {
            return Ok(self.clone());
        }
        let pad = |t: &Tensor| -> Result<Tensor> {
            let (b, h, _, d) = t.dims4()?;
            let zeros = Tensor::zeros((b, h, len - cur, d), t.dtype(), t.device())?;
            Ok(Tensor::cat(&[&zeros, t], 2)?)
        };
        let layers = self.layers.iter().map(|(k, v)| Ok((pad(k)?, pad(v)?))).collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers })
    }

    /// Concatenates caches of equal length along the batch.
    pub fn concat(caches: &[KvCache]) -> Result<KvCache> {
        let Some(first) = caches.first() else { return Ok(KvCache::default()) };
        let layers = (0..first.layers.len())
            .map(|l| {
                let ks: Vec<&Tensor> = caches.iter().map(|c| &c.layers[l].0).collect();
                let vs: Vec<&Tensor> = caches.iter().map(|c| &c.layers[l].1).collect();
                Ok((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers })
    }

    /// A cache from every layer's keys and values.
    pub fn from_layers(layers: Vec<(Tensor, Tensor)>) -> Self {
        KvCache { layers }
    }

    /// Every layer's keys and values.
    pub fn into_layers(self) -> Vec<(Tensor, Tensor)> {
        self.layers
    }
}

/// Inputs of one decoder pass that every layer shares.
pub struct Step<'a> {
    /// Rotary tables of the pass's positions.
    pub rotary: &'a Rotary,
    /// Additive mask `[B, 1, T, T_cache + T]`, or none when nothing is masked.
    pub mask: Option<&'a Tensor>,
}

/// The text model: embeddings, decoder layers, final norm and LM head.
pub struct TextModel {
    config: TextConfig,
    pub embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The LM head; the embedding matrix itself when embeddings are tied.
    pub lm_head: Tensor,
}

impl TextModel {
    /// Builds the text model from `model.*` (and `lm_head.*`) weights.
    pub fn new(config: &TextConfig, tie_word_embeddings: bool, w: &Weights) -> Result<Self> {
        let lin = |name: String, bias: bool| -> Result<Linear> {
            let weight = w.get(&format!("{name}.weight"))?.clone();
            let bias = if bias { Some(w.get(&format!("{name}.bias"))?.clone()) } else { None };
            Ok(Linear::new(weight, bias))
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    input_norm: w.get(&format!("{p}.input_layernorm.weight"))?.clone(),
                    post_norm: w.get(&format!("{p}.post_attention_layernorm.weight"))?.clone(),
                    inputs: Projections::Separate {
                        q: lin(format!("{p}.self_attn.q_proj"), true)?,
                        k: lin(format!("{p}.self_attn.k_proj"), true)?,
                        v: lin(format!("{p}.self_attn.v_proj"), true)?,
                        gate: lin(format!("{p}.mlp.gate_proj"), false)?,
                        up: lin(format!("{p}.mlp.up_proj"), false)?,
                    },
                    o: lin(format!("{p}.self_attn.o_proj"), false)?,
                    down: lin(format!("{p}.mlp.down_proj"), false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = w.get("model.embed_tokens.weight")?.clone();
        let lm_head = if tie_word_embeddings { embed_tokens.clone() } else { w.get("lm_head.weight")?.clone() };
        Ok(TextModel { config: config.clone(), embed_tokens, layers, norm: w.get("model.norm.weight")?.clone(), lm_head })
    }

    /// Every linear layer with its HF module name (`model.layers.N.self_attn.q_proj`, ...); an
    /// error once projections are fused, since the fused model has no per-module layers left.
    pub fn linears_mut(&mut self) -> Result<Vec<(String, &mut Linear)>> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let Projections::Separate { q, k, v, gate, up } = &mut l.inputs else {
                return Err(Error::Fusion { module: p, problem: "its projections are fused for inference; per-module layers need an unfused model".into() });
            };
            out.push((format!("{p}.self_attn.q_proj"), q));
            out.push((format!("{p}.self_attn.k_proj"), k));
            out.push((format!("{p}.self_attn.v_proj"), v));
            out.push((format!("{p}.self_attn.o_proj"), &mut l.o));
            out.push((format!("{p}.mlp.gate_proj"), gate));
            out.push((format!("{p}.mlp.up_proj"), up));
            out.push((format!("{p}.mlp.down_proj"), &mut l.down));
        }
        Ok(out)
    }

    /// Replaces every layer's q/k/v projections by one matmul over their stacked weights, and
    /// gate/up by another: three fewer kernel launches per layer and step, for models that only
    /// generate and score. The separate weights are dropped (a caller's [`Weights`] may still hold
    /// them). Refuses, before changing anything, when a projection has a LoRA adapter or a
    /// trainable weight: neither would survive stacking. Fusing twice is a no-op.
    pub fn fuse_projections(&mut self) -> Result<()> {
        for (i, l) in self.layers.iter().enumerate() {
            let Projections::Separate { q, k, v, gate, up } = &l.inputs else { continue };
            let named = [(q, "self_attn.q_proj"), (k, "self_attn.k_proj"), (v, "self_attn.v_proj"), (gate, "mlp.gate_proj"), (up, "mlp.up_proj")];
            for (lin, name) in named {
                if let Some(problem) = Stacked::refusal(lin) {
                    return Err(Error::Fusion { module: format!("model.layers.{i}.{name}"), problem: format!("{problem}; only frozen, unadapted projections can be fused") });
                }
            }
        }
        // Layer by layer, so that at most one layer's projections exist twice at a time.
        for l in &mut self.layers {
            let fused = match &l.inputs {
                Projections::Separate { q, k, v, gate, up } => Projections::Fused { qkv: Stacked::new(&[q, k, v])?, gate_up: Stacked::new(&[gate, up])? },
                Projections::Fused { .. } => continue,
            };
            l.inputs = fused;
        }
        Ok(())
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embeddings `[B, T, H]` of ids `[B, T]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))?)
    }

    /// Runs every layer over `x` `[B, T, H]` and returns the final-normed hidden states; with a
    /// cache, fills it with every layer's keys and values (a prefill).
    pub fn forward(&self, x: &Tensor, step: &Step<'_>, mut cache: Option<&mut KvCache>, exec: Exec) -> Result<Tensor> {
        if let Some(c) = cache.as_deref_mut() {
            c.layers.clear();
        }
        let mut x = x.clone();
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, step, exec, &mut |q, k, v| {
                let out = attention(q, &k, &v, step.mask, exec)?;
                if let Some(c) = cache.as_deref_mut() {
                    c.layers.push((k, v));
                }
                Ok(out)
            })?;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps, exec)
    }

    /// One decoding step: `x` `[N·K, 1, H]`, one new token per row of `cache`.
    pub fn decode(&self, x: &Tensor, step: &Step<'_>, cache: &mut GroupCache) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(layer, &x, step, Exec::Infer, &mut |q, k, v| cache.attend(i, q, &k, &v))?;
        }
        cache.advance();
        rms_norm(&x, &self.norm, self.config.rms_norm_eps, Exec::Infer)
    }

    /// Runs layer `i` alone (for gradient checkpointing), without a cache.
    pub fn layer(&self, i: usize, x: &Tensor, step: &Step<'_>, exec: Exec) -> Result<Tensor> {
        self.layer_forward(&self.layers[i], x, step, exec, &mut |q, k, v| attention(q, &k, &v, step.mask, exec))
    }

    /// The final norm alone.
    pub fn final_norm(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps, exec)
    }

    /// One layer; `attend(q, k, v)` `[B, H|Hkv, T, D]` returns the attention output `[B, H, T, D]`.
    fn layer_forward(&self, l: &Layer, x: &Tensor, step: &Step<'_>, exec: Exec, attend: &mut dyn FnMut(&Tensor, Tensor, Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let h = rms_norm(x, &l.input_norm, c.rms_norm_eps, exec)?;
        let [q, k, v] = match &l.inputs {
            Projections::Separate { q, k, v, .. } => [q.forward(&h)?, k.forward(&h)?, v.forward(&h)?],
            Projections::Fused { qkv, .. } => qkv.forward(&h)?,
        };
        let split = |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?) };
        let q = step.rotary.apply(&split(q, heads)?)?;
        let k = step.rotary.apply(&split(k, kv_heads)?)?;
        let v = split(v, kv_heads)?.contiguous()?;
        let attn = attend(&q, k, v)?.transpose(1, 2)?.reshape((b, t, heads * hd))?;
        let x = (x + l.o.forward(&attn)?)?;
        let h = rms_norm(&x, &l.post_norm, c.rms_norm_eps, exec)?;
        let [gate, up] = match &l.inputs {
            Projections::Separate { gate, up, .. } => [gate.forward(&h)?, up.forward(&h)?],
            Projections::Fused { gate_up, .. } => gate_up.forward(&h)?,
        };
        let mlp = l.down.forward(&(gate.silu()? * up)?)?;
        Ok((x + mlp)?)
    }
}
