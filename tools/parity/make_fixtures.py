#!/usr/bin/env python3
"""Regenerate the Qwen2.5-VL parity fixtures under crates/model/tests/fixtures/parity/.

How to run (from the repository root):

    python -m venv /tmp/venv-parity
    /tmp/venv-parity/bin/pip install -r tools/parity/requirements.txt
    /tmp/venv-parity/bin/python tools/parity/make_fixtures.py

CPU only, no network, no model-hub downloads: both models are tiny random
Qwen2.5-VL models built from fixed seeds. Takes well under a minute.
Output is deterministic for a given set of package versions (pinned in
tools/parity/requirements.txt). The file layout is described in
crates/model/tests/fixtures/parity/README.md.

Options:
    --out DIR      write somewhere else (default: crates/model/tests/fixtures/parity)
    --case NAME    only build one case (v5_untied or v4_tied)

Cases:
    v5_untied  saved by transformers 5.17 save_pretrained as-is (nested
               text_config, rope_parameters, legacy tensor names, f32,
               processor_config.json + chat_template.jinja).
    v4_tied    the same kind of model re-written into the transformers 4.x
               layout (flat config with rope_theta / rope_scaling,
               preprocessor_config.json, chat template inside
               tokenizer_config.json, tensor names model.visual.* /
               model.language_model.*, bf16, two shards + index).

This module is also imported by tools/parity/check_cli.py (model building,
v4 rewrite, prompt encoding, reference scoring and generation).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO / "crates/model/assets/qwen2_vl_chat_template.jinja"
DEFAULT_OUT = REPO / "crates/model/tests/fixtures/parity"

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Small built-in English corpus for the tiny BPE (medical VQA flavoured, with the
# chat-template words and the <think>/<answer> tags so that they get merges).
CORPUS = [
    "You are a helpful assistant.",
    "system user assistant",
    "What is shown in the image?",
    "What abnormality is seen in the chest X-ray?",
    "Which organ is visible in this CT scan?",
    "Is there evidence of a fracture in the left femur?",
    "Answer with the letter of the correct option.",
    "Options: A. pneumonia B. normal C. effusion D. mass",
    "First think about the reasoning process in the mind and then provide the user with the answer.",
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively.",
    "<think> reasoning process here </think><answer> answer here </answer>",
    "<think> The image shows a round opacity in the right lower lobe. </think><answer>B</answer>",
    "<think> There is no visible fracture and the bone cortex is intact. </think><answer>A</answer>",
    "<think> The heart is enlarged and the lungs show fluid. </think><answer>C</answer>",
    "<think> The lesion is bright on the T2 weighted MRI image. </think><answer>D</answer>",
    "The patient is a 45 year old woman with a cough and fever for three days.",
    "The scan of the abdomen shows the liver, the kidneys and the spleen.",
    "A small nodule is present in the upper lobe of the left lung.",
    "The brain MRI shows a lesion near the ventricle with surrounding edema.",
    "Describe the findings in the image in one sentence.",
    "Is this image normal or abnormal? Answer yes or no.",
    "The answer is yes. The answer is no. The answer is normal.",
    "What is the modality of this image? It is an ultrasound image.",
    "Where is the lesion located? The lesion is in the liver.",
    "How many kidneys are seen? Two kidneys are seen.",
    "Pathology slide with stained cells and a dense nucleus.",
    "The skin photo shows a dark irregular mole with uneven borders.",
    "Retina fundus image with small bleeding spots and exudates.",
    "Look at the picture and then give the answer in a short word or phrase.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 12 25 100 and units mm cm ml.",
    "It's the patient's left side; they're stable, we'll see, I've checked, you'd agree.",
]

# Text that every templated prompt contains; weighted up in training so that the
# chat-template words get merged and prompts stay short (small logits fixtures).
TEMPLATE_CORPUS = ["system\nYou are a helpful assistant.\nuser\nassistant\n", "<think> </think><answer> </answer>"]


# ----------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------


def build_tokenizer(bpe_vocab_size: int, extra_corpus: list[str] | None = None) -> Tokenizer:
    """Qwen2-style byte-level BPE trained on the built-in corpus (+ extra_corpus),
    plus Qwen's special tokens appended as added special tokens
    (ids bpe_vocab_size .. bpe_vocab_size+7, in SPECIAL_TOKENS order)."""
    corpus = (CORPUS + list(extra_corpus or [])) * 4 + TEMPLATE_CORPUS * 40
    tok = Tokenizer(
        models.BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer)
    if tok.get_vocab_size() != bpe_vocab_size:
        raise RuntimeError(f"BPE reached {tok.get_vocab_size()} tokens, wanted {bpe_vocab_size}")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


def hf_tokenizer(tok: Tokenizer, chat_template: str) -> Qwen2Tokenizer:
    t = Qwen2Tokenizer(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=32768,
        extra_special_tokens=list(SPECIAL_TOKENS),
    )
    t.chat_template = chat_template
    return t


def special_ids(tok) -> dict[str, int]:
    return {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------


def make_config(spec: dict, ids: dict[str, int]) -> Qwen2_5_VLConfig:
    t, v = spec["text"], spec["vision"]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=spec["vocab_size"],
            hidden_size=t["hidden"],
            intermediate_size=t["intermediate"],
            num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"],
            num_key_value_heads=t["kv_heads"],
            hidden_act="silu",
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": t.get("rope_theta", 1e6), "mrope_section": list(t["mrope_section"])},
            use_sliding_window=False,
            max_window_layers=t["layers"],
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=v["depth"],
            hidden_size=v["hidden"],
            num_heads=v["heads"],
            intermediate_size=v["intermediate"],
            out_hidden_size=t["hidden"],
            hidden_act="silu",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=v["window_size"],
            fullatt_block_indexes=list(v["fullatt_block_indexes"]),
            tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        tie_word_embeddings=bool(spec["tie"]),
    )
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def randomize_params(model: torch.nn.Module, seed: int, std: float = 0.1, embed_std: float = 0.3) -> None:
    """Overwrite every parameter with seeded random values. transformers' own init
    sets norm weights to 1 and biases to 0, which would hide missing norm weights or
    biases in a re-implementation, so norms get U(0.6, 1.4) and biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied parameters appear once
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "layernorm" in name or name.endswith("norm.weight") or "ln_q" in name:
            p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.6)
        elif name.endswith(".bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif "embed_tokens" in name or name.startswith("lm_head"):
            p.copy_(torch.randn(p.shape, generator=g) * embed_std)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def round_params_to_bf16(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).to(torch.float32))


def build_model(spec: dict, ids: dict[str, int], seed: int) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = make_config(spec, ids)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32)
    randomize_params(model, seed + 1, spec.get("init_std", 0.1), spec.get("embed_std", 0.3))
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.eval()
    return model


def v5_saved_name(in_memory_name: str) -> str:
    """transformers 5.17 save_pretrained writes legacy names (reverse of conversion_mapping)."""
    if in_memory_name.startswith("model.visual."):
        return in_memory_name[len("model.") :]
    if in_memory_name.startswith("model.language_model."):
        return "model." + in_memory_name[len("model.language_model.") :]
    return in_memory_name


def make_processor(tok: Qwen2Tokenizer, min_pixels: int, max_pixels: int, chat_template: str) -> Qwen2_5_VLProcessor:
    # NB: Qwen2VLImageProcessor.__init__ mutates its class-level `size` dict when
    # min_pixels / max_pixels are given, so always pass both explicitly.
    ip = Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    vp = Qwen2VLVideoProcessor()
    return Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=chat_template)


# ----------------------------------------------------------------------------
# transformers 4.x layout rewrite
# ----------------------------------------------------------------------------


def v4_config_dict(spec: dict, ids: dict[str, int], torch_dtype: str = "bfloat16") -> dict:
    t, v = spec["text"], spec["vision"]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": t["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": t["intermediate"],
        "max_position_embeddings": 4096,
        "max_window_layers": t["layers"],
        "model_type": "qwen2_5_vl",
        "num_attention_heads": t["heads"],
        "num_hidden_layers": t["layers"],
        "num_key_value_heads": t["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t["mrope_section"])},
        "rope_theta": float(t.get("rope_theta", 1e6)),
        "sliding_window": 4096,
        "tie_word_embeddings": bool(spec["tie"]),
        "torch_dtype": torch_dtype,
        "transformers_version": "4.49.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": v["depth"],
            "hidden_act": "silu",
            "hidden_size": v["hidden"],
            "intermediate_size": v["intermediate"],
            "num_heads": v["heads"],
            "in_chans": 3,
            "out_hidden_size": t["hidden"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": v["window_size"],
            "fullatt_block_indexes": list(v["fullatt_block_indexes"]),
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "vocab_size": spec["vocab_size"],
    }


def v4_tokenizer_config(tok: Qwen2Tokenizer, chat_template: str) -> dict:
    added = {}
    for s in SPECIAL_TOKENS:
        added[str(tok.convert_tokens_to_ids(s))] = {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [s for s in SPECIAL_TOKENS if s != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def v4_preprocessor_config(min_pixels: int, max_pixels: int) -> dict:
    return {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_sharded(state: dict[str, torch.Tensor], out_dir: Path, n_shards: int) -> dict:
    """Write `state` as n_shards safetensors files + model.safetensors.index.json.
    Keys are sorted and cut into contiguous runs of roughly equal byte size."""
    keys = sorted(state)
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    total = sum(sizes)
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    acc = 0
    for k, s in zip(keys, sizes):
        idx = min(n_shards - 1, int(acc * n_shards / total))
        shards[idx].append(k)
        acc += s
    weight_map = {}
    for i, ks in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in ks}, str(out_dir / fname), metadata={"format": "pt"})
        for k in ks:
            weight_map[k] = fname
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(out_dir / "model.safetensors.index.json", index)
    return index


def save_v4_layout(
    model: Qwen2_5_VLForConditionalGeneration,
    tok: Qwen2Tokenizer,
    spec: dict,
    ids: dict[str, int],
    out_dir: Path,
    min_pixels: int,
    max_pixels: int,
    chat_template: str,
    dtype: torch.dtype = torch.bfloat16,
    n_shards: int = 2,
) -> None:
    """Write a transformers-4.x style model directory (flat config, rope_scaling,
    preprocessor_config.json, chat template in tokenizer_config.json, tensor names
    model.visual.* / model.language_model.* (+ lm_head.weight when untied))."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, p in model.named_parameters():  # tied lm_head is not listed
        state[name] = p.detach().to(dtype).clone()
    if not spec["tie"]:
        assert "lm_head.weight" in state
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dtype]
    if n_shards <= 1:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        write_sharded(state, out_dir, n_shards)
    write_json(out_dir / "config.json", v4_config_dict(spec, ids, dtype_name))
    write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
            "transformers_version": "4.49.0",
        },
    )
    write_json(out_dir / "preprocessor_config.json", v4_preprocessor_config(min_pixels, max_pixels))
    write_json(out_dir / "tokenizer_config.json", v4_tokenizer_config(tok, chat_template))
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))


# ----------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------


def smooth_rgb(rng: np.random.Generator, h: int, w: int, noise: float = 3.0) -> np.ndarray:
    """Deterministic 'photo-like' RGB uint8 image: low-frequency waves + shapes + noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    s = float(max(h, w))
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(-5, 5, size=2)
            ph = rng.uniform(0, 2 * math.pi)
            img[..., c] += rng.uniform(0.3, 1.0) * np.sin(2 * math.pi * (fx * xx + fy * yy) / s + ph)
    img = (img - img.min()) / (img.max() - img.min() + 1e-9) * 200 + 20
    for _ in range(3):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = min(h, y0 + rng.integers(4, max(5, h // 3))), min(w, x0 + rng.integers(4, max(5, w // 3)))
        img[y0:y1, x0:x1] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, noise, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_image(rng: np.random.Generator, h: int, w: int, mode: str, noise: float = 3.0) -> Image.Image:
    rgb = smooth_rgb(rng, h, w, noise)
    if mode == "RGB":
        return Image.fromarray(rgb, "RGB")
    if mode == "L":
        return Image.fromarray(rgb, "RGB").convert("L")
    if mode == "P":
        return Image.fromarray(rgb, "RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    if mode == "RGBA":
        # alpha: left third fully transparent, middle third a ramp, right third opaque,
        # with random RGB underneath (so "drop alpha" and "composite on white" differ)
        xx = np.arange(w)[None, :].repeat(h, 0).astype(np.float64)
        a = np.clip((xx - w / 3) / (w / 3), 0, 1) * 255
        a[: h // 4] = 128  # a semi-transparent band
        rgba = np.concatenate([rgb, np.round(a).astype(np.uint8)[..., None]], axis=-1)
        return Image.fromarray(rgba, "RGBA")
    raise ValueError(mode)


def save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False, compress_level=9)
    with Image.open(path) as back:
        assert back.mode == img.mode, (back.mode, img.mode)


def open_image(path: Path) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


# ----------------------------------------------------------------------------
# prompts, encoding, reference computations
# ----------------------------------------------------------------------------


def messages_for(n_images: int, prompt: str, system: str | None = None) -> list[dict]:
    msgs = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    msgs.append({"role": "user", "content": content})
    return msgs


def encode(processor, images: list[Image.Image], prompt: str, completion: str | None, system: str | None = None) -> dict:
    """Prompt rendered by the real processor chat template (default system prompt unless
    `system`), <|image_pad|> expanded by the processor; completion tokenised separately
    without special tokens and appended."""
    text = processor.apply_chat_template(messages_for(len(images), prompt, system), tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=images if images else None, return_tensors="pt")
    prompt_ids = enc["input_ids"][0]
    mm = enc["mm_token_type_ids"][0]
    out = {"text": text, "prompt_ids": prompt_ids.clone(), "prompt_len": int(prompt_ids.shape[0])}
    if completion is not None:
        comp = processor.tokenizer(completion, add_special_tokens=False)["input_ids"]
        comp = torch.tensor(comp, dtype=torch.long)
        out["completion_ids"] = comp
        out["input_ids"] = torch.cat([prompt_ids, comp])
        out["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(comp, dtype=mm.dtype)])
    else:
        out["input_ids"] = prompt_ids
        out["mm_token_type_ids"] = mm
    if images:
        out["pixel_values"] = enc["pixel_values"].to(torch.float32)
        out["image_grid_thw"] = enc["image_grid_thw"].to(torch.long)
    return out


def forward_item(model, item: dict):
    ids = item["input_ids"][None]
    kw = dict(input_ids=ids, mm_token_type_ids=item["mm_token_type_ids"][None], use_cache=False)
    if "pixel_values" in item:
        kw.update(pixel_values=item["pixel_values"], image_grid_thw=item["image_grid_thw"])
    return model(**kw).logits[0]


def completion_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    lp = torch.log_softmax(logits.float(), dim=-1)
    tgt = input_ids[prompt_len:]
    return lp[prompt_len - 1 : input_ids.shape[0] - 1].gather(-1, tgt[:, None])[:, 0]


def position_ids_for(model, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
    pos, delta = model.model.get_rope_index(
        item["input_ids"][None],
        item["mm_token_type_ids"][None],
        image_grid_thw=item.get("image_grid_thw"),
    )
    return pos[:, 0], delta.reshape(-1)


@torch.no_grad()
def greedy_generate(model, processor, images, prompt, system, max_new_tokens):
    """transformers greedy generate; returns dict with generated ids, text, logprobs
    (log_softmax of the raw step logits at the chosen token) and step margins."""
    item = encode(processor, images, prompt, None, system)
    kw = dict(
        input_ids=item["input_ids"][None],
        attention_mask=torch.ones_like(item["input_ids"])[None],
        mm_token_type_ids=item["mm_token_type_ids"][None],
    )
    if "pixel_values" in item:
        kw.update(pixel_values=item["pixel_values"], image_grid_thw=item["image_grid_thw"])
    out = model.generate(
        **kw,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
    )
    seq = out.sequences[0, item["prompt_len"] :]
    gen = seq.tolist()
    logprobs, margins = [], []
    for step, tok_id in enumerate(gen):
        lg = out.logits[step][0].float()
        lp = torch.log_softmax(lg, -1)
        logprobs.append(float(lp[tok_id]))
        top2 = torch.topk(lg, 2).values
        margins.append(float(top2[0] - top2[1]))
    eos = model.generation_config.eos_token_id
    eos_set = set(eos if isinstance(eos, list) else [eos])
    return {
        "item": item,
        "token_ids": gen,
        "text": processor.tokenizer.decode(gen, skip_special_tokens=True),
        "logprobs": logprobs,
        "margins": margins,
        "stopped_at_eos": bool(gen and gen[-1] in eos_set),
    }


@torch.no_grad()
def manual_greedy(model, item: dict, n: int) -> list[int]:
    """Greedy decoding with a full forward per step (no KV cache): cross-check of generate."""
    ids = item["input_ids"].clone()
    mm = item["mm_token_type_ids"].clone()
    out = []
    for _ in range(n):
        it = dict(item, input_ids=ids, mm_token_type_ids=mm)
        nxt = int(forward_item(model, it)[-1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt])])
        mm = torch.cat([mm, torch.zeros(1, dtype=mm.dtype)])
    return out


def vision_debug(model, item: dict) -> dict[str, torch.Tensor]:
    """Intermediate vision tensors for debugging."""
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_window_index

    vis = model.model.visual
    grid = item["image_grid_thw"]
    window_index, cu_window = get_vision_window_index(
        grid, spatial_merge_size=vis.spatial_merge_size, window_size=vis.window_size, patch_size=vis.patch_size, kwargs={}
    )
    cu, _ = get_vision_attention_seqlens(grid, vis.config, kwargs={})
    with torch.no_grad():
        patch = vis.patch_embed(item["pixel_values"])
        out = vis(item["pixel_values"], grid_thw=grid)
    return {
        "vision.window_index": torch.as_tensor(window_index).to(torch.long),
        "vision.cu_window_seqlens": torch.as_tensor(cu_window).to(torch.long),
        "vision.cu_seqlens": torch.as_tensor(cu).to(torch.long),
        "vision.patch_embeds": patch.float(),
        "vision.last_hidden_window_order": out.last_hidden_state.float(),
        "image_embeds": out.pooler_output.float(),
    }


# ----------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------

CASES = {
    "v5_untied": {
        # seeds / init scales picked so that greedy generation is not degenerate, emits no
        # special or out-of-tokenizer ids and has top-2 logit margins >= 1e-3 (see summary.json)
        "seed": 211,
        "image_seed": 11,
        "bpe_vocab": 352,  # + 8 specials = 360 tokens
        "vocab_size": 376,
        "tie": False,
        "layout": "v5",
        "init_std": 0.1,
        "embed_std": 0.3,
        "text": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "mrope_section": [2, 3, 3]},
        "vision": {"depth": 4, "hidden": 32, "heads": 2, "intermediate": 64, "window_size": 56, "fullatt_block_indexes": [1, 3]},
        "min_pixels": 3136,
        "max_pixels": 28224,
        # images: file name -> (height, width, PIL mode); sides are multiples of 28 -> no resize
        "images": {
            "a_84x140.png": (84, 140, "RGB"),
            "b_56x84.png": (56, 84, "RGB"),
            "c_56x112.png": (56, 112, "RGB"),
            "d_112x140.png": (112, 140, "RGB"),
            "e_rgba_56x56.png": (56, 56, "RGBA"),
            "f_gray_56x56.png": (56, 56, "L"),
            "g_palette_56x56.png": (56, 56, "P"),
        },
        "score": [
            {
                "images": ["a_84x140.png"],
                "prompt": "What is shown? A. mass B. normal",
                "completion": "<think> A round mass. </think><answer>A</answer>",
            },
            {
                "images": ["b_56x84.png", "c_56x112.png"],
                "prompt": "Which one is abnormal?",
                "completion": "<think> The second\nshows  a nodule (12 mm). </think><answer>B</answer>",
            },
            {
                "images": ["d_112x140.png"],
                "prompt": "Describe the image.",
                "completion": "<think> The liver; it's normal. </think><answer>normal</answer>",
            },
            {
                "images": [],
                "prompt": "Is a cafe\u0301 spot (\u2248 3 cm) a lesion?",
                "completion": "<think> Yes, café-au-lait. </think><answer>yes</answer>",
            },
            {
                "images": ["e_rgba_56x56.png", "f_gray_56x56.png", "g_palette_56x56.png"],
                "prompt": "Which is the MRI?",
                "completion": "<think> The third. </think><answer>C</answer>",
            },
        ],
        "generate": [
            {"images": ["a_84x140.png"], "prompt": "What is shown in the image?", "system": None},
            {"images": ["b_56x84.png", "c_56x112.png"], "prompt": "Describe both images.", "system": "You are a careful radiologist."},
            {"images": [], "prompt": "Which organ is visible in this CT scan?", "system": None},
        ],
        # images that DO need resizing (height, width, mode): round / max / min branch of smart_resize
        "resize": {
            "r0_100x150.png": (100, 150, "RGB"),
            "r1_300x200.png": (300, 200, "RGB"),
            "r2_30x45.png": (30, 45, "RGB"),
        },
    },
    "v4_tied": {
        "seed": 103,
        "image_seed": 22,
        "bpe_vocab": 336,  # + 8 specials = 344 tokens
        "vocab_size": 352,
        "tie": True,
        "layout": "v4",
        "init_std": 0.2,
        "embed_std": 0.2,
        "text": {"layers": 3, "hidden": 48, "heads": 4, "kv_heads": 1, "intermediate": 80, "mrope_section": [2, 2, 2]},
        "vision": {"depth": 3, "hidden": 32, "heads": 2, "intermediate": 56, "window_size": 112, "fullatt_block_indexes": [2]},
        "min_pixels": 3136,
        "max_pixels": 200704,
        "images": {
            "a_112x84.png": (112, 84, "RGB"),
            "b_84x56.png": (84, 56, "RGB"),
            "c_56x112.png": (56, 112, "RGB"),
            "d_140x168.png": (140, 168, "RGB"),
            "e_rgba_56x56.png": (56, 56, "RGBA"),
            "f_gray_56x56.png": (56, 56, "L"),
            "g_palette_56x56.png": (56, 56, "P"),
        },
        "score": [
            {
                "images": ["a_112x84.png"],
                "prompt": "Which organ is visible?",
                "completion": "<think> The kidneys. </think><answer>D</answer>",
            },
            {
                "images": ["b_84x56.png", "c_56x112.png"],
                "prompt": "Is there a fracture?",
                "completion": "<think> No;\nthe cortex is intact. </think><answer>no</answer>",
            },
            {
                "images": ["d_140x168.png"],
                "prompt": "What is the modality?",
                "completion": "<think> Ultrasound, 2 regions. </think><answer>ultrasound</answer>",
            },
            {
                "images": [],
                "prompt": "A 45 year old woman has a cough. What is likely?",
                "completion": "<think> An infection. </think><answer>B. pneumonia</answer>",
            },
            {
                "images": ["e_rgba_56x56.png", "f_gray_56x56.png", "g_palette_56x56.png"],
                "prompt": "How many show a lesion?",
                "completion": "<think> Two. </think><answer>2</answer>",
            },
        ],
        "generate": [
            {"images": ["a_112x84.png"], "prompt": "Describe the findings in the image.", "system": None},
            {"images": ["b_84x56.png", "c_56x112.png"], "prompt": "What is shown?", "system": "You are a helpful medical assistant."},
            {"images": [], "prompt": "Where is the lesion located?", "system": "Answer briefly."},
        ],
        "resize": {},
    },
}


def dump_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def patchify_reference(rgb_u8: np.ndarray, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
    """Plain numpy Qwen2-VL rescale + normalise + patchify of an already-resized [H,W,3] uint8 image."""
    # transformers 5.17 (torchvision backend) fuses rescale and normalise:
    # y = (x - f32(mean_f32 * 255)) / f32(std_f32 * 255), all in f32 -> bit-exact.
    m = (np.asarray(mean, np.float32) * np.float32(255.0)).astype(np.float32)
    s = (np.asarray(std, np.float32) * np.float32(255.0)).astype(np.float32)
    x = (rgb_u8.astype(np.float32) - m) / s
    x = x.transpose(2, 0, 1)  # C,H,W
    c, h, w = x.shape
    gh, gw = h // 14, w // 14
    x = x.reshape(c, gh // 2, 2, 14, gw // 2, 2, 14).transpose(1, 4, 2, 5, 0, 3, 6)  # bh,bw,ih,iw,C,ph,pw
    x = np.repeat(x[:, :, :, :, :, None], 2, axis=5)  # temporal axis after C
    return x.reshape(gh * gw, c * 2 * 14 * 14)


def build_case(name: str, spec: dict, out_root: Path, log=print) -> dict:
    case_dir = out_root / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    (case_dir / "images").mkdir(parents=True)
    model_dir = case_dir / "model"
    chat_template = TEMPLATE_PATH.read_text(encoding="utf-8")
    summary: dict = {"case": name}

    # ---- tokenizer / processor / model ------------------------------------------------
    case_texts = [x["prompt"] for x in spec["score"] + spec["generate"]] + [x["completion"] for x in spec["score"]]
    raw_tok = build_tokenizer(spec["bpe_vocab"], case_texts)
    tok = hf_tokenizer(raw_tok, chat_template)
    ids = special_ids(tok)
    assert len(tok) == spec["bpe_vocab"] + len(SPECIAL_TOKENS) <= spec["vocab_size"]
    summary["special_ids"] = ids
    summary["tokenizer_size"] = len(tok)
    model = build_model(spec, ids, spec["seed"])
    processor = make_processor(tok, spec["min_pixels"], spec["max_pixels"], chat_template)

    if spec["layout"] == "v5":
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        ref_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        saved_keys = set(load_file(str(model_dir / "model.safetensors")).keys())
        name_of = v5_saved_name
    else:
        round_params_to_bf16(model)
        save_v4_layout(model, tok, spec, ids, model_dir, spec["min_pixels"], spec["max_pixels"], chat_template)
        ref_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        saved_keys = set(index["weight_map"])
        name_of = lambda n: n  # noqa: E731
    ref_model.eval()
    # the reloaded model must be bit-identical to the in-memory one
    sd_a, sd_b = model.state_dict(), ref_model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    assert ref_model.config.text_config.rope_parameters["mrope_section"] == spec["text"]["mrope_section"]
    assert bool(ref_model.config.tie_word_embeddings) == bool(spec["tie"])
    param_names = [n for n, _ in ref_model.named_parameters()]
    assert {name_of(n) for n in param_names} == saved_keys, sorted(set(map(name_of, param_names)) ^ saved_keys)
    model = ref_model
    # the processor as a Rust user would see it: reloaded from the model dir
    processor = AutoProcessor.from_pretrained(model_dir)
    if processor.chat_template is None:  # 4.x layout: template only in tokenizer_config.json
        summary["processor_chat_template_from_tokenizer_config"] = False
        processor.chat_template = processor.tokenizer.chat_template
    assert processor.tokenizer.chat_template == chat_template
    assert processor.image_processor.size["shortest_edge"] == spec["min_pixels"]
    assert processor.image_processor.size["longest_edge"] == spec["max_pixels"]
    assert special_ids(processor.tokenizer) == ids
    summary["model_files"] = sorted(os.listdir(model_dir))
    summary["n_params"] = sum(p.numel() for p in model.parameters())

    # ---- images ------------------------------------------------------------------------
    rng = np.random.default_rng(spec["image_seed"])
    for fname, (h, w, mode) in list(spec["images"].items()) + list(spec["resize"].items()):
        save_png(make_image(rng, h, w, mode), case_dir / "images" / fname)

    tensors: dict[str, torch.Tensor] = {}

    # ---- score items -------------------------------------------------------------------
    score_in, score_out, items = [], [], []
    for i, it in enumerate(spec["score"]):
        paths = [case_dir / "images" / f for f in it["images"]]
        pil = [open_image(p) for p in paths]
        for p, (fname) in zip(pil, it["images"]):
            h, w, _ = spec["images"][fname]
            assert p.size == (w, h)
        item = encode(processor, pil, it["prompt"], it["completion"])
        # image path given to the chat template (transformers loads it itself) -> same pixels
        if pil:
            msgs = [{"role": "user", "content": [{"type": "image", "path": str(p)} for p in paths] + [{"type": "text", "text": it["prompt"]}]}]
            enc2 = processor.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt")
            assert torch.equal(enc2["input_ids"][0], item["prompt_ids"])
            assert torch.equal(enc2["pixel_values"], item["pixel_values"]), "path vs PIL pixel mismatch"
            grid = item["image_grid_thw"]
            for (fname), g in zip(it["images"], grid.tolist()):
                h, w, _ = spec["images"][fname]
                assert g == [1, h // 14, w // 14], (fname, g)  # no resize happened
            # independent numpy patchify of the RGB-converted file
            ref_pv = np.concatenate([patchify_reference(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
            assert np.array_equal(ref_pv, item["pixel_values"].numpy()), "numpy normalise+patchify is not bit-exact"
        n_pad = int((item["input_ids"] == ids["<|image_pad|>"]).sum())
        assert n_pad == (int(item["image_grid_thw"].prod(-1).sum()) // 4 if pil else 0)
        assert processor.tokenizer.decode(item["completion_ids"]) == unicodedata.normalize("NFC", it["completion"])
        items.append(item)
        with torch.no_grad():
            logits = forward_item(model, item).float()
        pos, delta = position_ids_for(model, item)
        with torch.no_grad():  # explicit position ids give the same logits
            kw = dict(input_ids=item["input_ids"][None], position_ids=pos[:, None], use_cache=False)
            if pil:
                kw.update(pixel_values=item["pixel_values"], image_grid_thw=item["image_grid_thw"])
            logits2 = model(**kw).logits[0]
        assert torch.allclose(logits, logits2, atol=1e-6, rtol=0)
        lp = completion_logprobs(logits, item["input_ids"], item["prompt_len"])
        p = f"i{i}."
        tensors[p + "input_ids"] = item["input_ids"].to(torch.long)
        tensors[p + "mm_token_type_ids"] = item["mm_token_type_ids"].to(torch.long)
        tensors[p + "prompt_len"] = torch.tensor([item["prompt_len"]], dtype=torch.long)
        tensors[p + "position_ids"] = pos.to(torch.long)
        tensors[p + "rope_delta"] = delta.to(torch.long)
        tensors[p + "logits"] = logits.contiguous()
        tensors[p + "completion_logprobs"] = lp.contiguous()
        if pil:
            tensors[p + "pixel_values"] = item["pixel_values"].contiguous()
            tensors[p + "image_grid_thw"] = item["image_grid_thw"].to(torch.long)
            for k, v in vision_debug(model, item).items():
                tensors[p + k] = v.contiguous()
            with torch.no_grad():
                emb = torch.cat(model.model.get_image_features(item["pixel_values"], item["image_grid_thw"]).pooler_output)
            assert torch.allclose(emb, tensors[p + "image_embeds"], atol=1e-6, rtol=0)
        row_in = {"images": [f"images/{f}" for f in it["images"]], "prompt": it["prompt"], "completion": it["completion"]}
        score_in.append(row_in)
        score_out.append(dict(row_in, completion_token_ids=item["completion_ids"].tolist(), token_logprobs=[float(x) for x in lp]))
    dump_jsonl(case_dir / "score_in.jsonl", score_in)
    dump_jsonl(case_dir / "score_out.jsonl", score_out)

    # ---- left-padded batch -------------------------------------------------------------
    pad_id = ids["<|endoftext|>"]
    tmax = max(int(it["input_ids"].shape[0]) for it in items)
    B = len(items)
    b_ids = torch.full((B, tmax), pad_id, dtype=torch.long)
    b_mask = torch.zeros((B, tmax), dtype=torch.long)
    b_mm = torch.zeros((B, tmax), dtype=torch.long)
    for b, it in enumerate(items):
        n = it["input_ids"].shape[0]
        b_ids[b, tmax - n :] = it["input_ids"]
        b_mask[b, tmax - n :] = 1
        b_mm[b, tmax - n :] = it["mm_token_type_ids"]
    # the processor/tokenizer left padding agrees with the manual one
    padded = processor.tokenizer.pad({"input_ids": [it["input_ids"].tolist() for it in items]}, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(padded["input_ids"], b_ids) and torch.equal(padded["attention_mask"], b_mask)
    b_pv = torch.cat([it["pixel_values"] for it in items if "pixel_values" in it])
    b_grid = torch.cat([it["image_grid_thw"] for it in items if "image_grid_thw" in it])
    with torch.no_grad():
        b_logits = model(
            input_ids=b_ids,
            attention_mask=b_mask,
            mm_token_type_ids=b_mm,
            pixel_values=b_pv,
            image_grid_thw=b_grid,
            use_cache=False,
        ).logits.float()
    b_pos, b_delta = model.model.get_rope_index(b_ids, b_mm, image_grid_thw=b_grid, attention_mask=b_mask)
    max_batch_diff = 0.0
    for b, it in enumerate(items):
        n = it["input_ids"].shape[0]
        d = (b_logits[b, tmax - n :] - tensors[f"i{b}.logits"]).abs().max().item()
        max_batch_diff = max(max_batch_diff, d)
        assert torch.equal(b_pos[:, b, tmax - n :], tensors[f"i{b}.position_ids"])
    assert max_batch_diff < 1e-4, max_batch_diff
    assert torch.equal(b_pv, torch.cat([tensors[f"i{b}.pixel_values"] for b in range(B) if f"i{b}.pixel_values" in tensors]))
    summary["batch_vs_single_max_abs_logit_diff"] = max_batch_diff
    tensors.update(
        {
            "batch.input_ids": b_ids,
            "batch.attention_mask": b_mask,
            "batch.mm_token_type_ids": b_mm,
            "batch.position_ids": b_pos.to(torch.long).contiguous(),
            "batch.logits": b_logits.contiguous(),
            # batch.pixel_values is NOT stored (size budget): it is exactly
            # cat(i{b}.pixel_values for the items with images), asserted above.
            "batch.image_grid_thw": b_grid,
        }
    )

    # ---- gradients ---------------------------------------------------------------------
    model.zero_grad(set_to_none=True)
    loss = torch.zeros(())
    for it in items:
        lg = forward_item(model, it)
        loss = loss + completion_logprobs(lg, it["input_ids"], it["prompt_len"]).sum()
    loss.backward()
    assert abs(loss.item() - sum(sum(r["token_logprobs"]) for r in score_out)) < 1e-3
    tensors["loss"] = loss.detach().reshape(1).float()
    n_zero = []
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        g = p.grad.detach().float().contiguous()
        if not torch.any(g != 0):
            n_zero.append(n)
        tensors["grad." + name_of(n)] = g
    summary["zero_grads"] = n_zero
    summary["loss"] = loss.item()

    # ---- greedy generation ---------------------------------------------------------------
    gen_rows = []
    min_margin = float("inf")
    for g in spec["generate"]:
        pil = [open_image(case_dir / "images" / f) for f in g["images"]]
        r = greedy_generate(model, processor, pil, g["prompt"], g["system"], 12)
        manual = manual_greedy(model, r["item"], len(r["token_ids"]))
        assert manual == r["token_ids"], (manual, r["token_ids"])
        min_margin = min(min_margin, min(r["margins"]))
        gen_rows.append(
            {
                "images": [f"images/{f}" for f in g["images"]],
                "prompt": g["prompt"],
                "system": g["system"],
                "max_new_tokens": 12,
                "prompt_token_ids": r["item"]["input_ids"].tolist(),
                "token_ids": r["token_ids"],
                "text": r["text"],
                "logprobs": r["logprobs"],
                "min_top2_logit_margin": min(r["margins"]),
                "stopped_at_eos": r["stopped_at_eos"],
            }
        )
    dump_jsonl(case_dir / "generate.jsonl", gen_rows)
    summary["generate_min_margin"] = min_margin
    summary["generate_stopped_at_eos"] = [r["stopped_at_eos"] for r in gen_rows]

    # ---- resize cases (need resizing; loose tests) ---------------------------------------
    if spec["resize"]:
        from transformers.image_utils import SizeDict
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = processor.image_processor
        ip_pil = Qwen2VLImageProcessorPil(
            size={"shortest_edge": spec["min_pixels"], "longest_edge": spec["max_pixels"]},
            min_pixels=spec["min_pixels"],
            max_pixels=spec["max_pixels"],
        )
        for k, (fname, (h, w, _mode)) in enumerate(spec["resize"].items()):
            img = open_image(case_dir / "images" / fname)
            enc = ip(images=[img], return_tensors="pt")
            rh, rw = smart_resize(h, w, 28, spec["min_pixels"], spec["max_pixels"])
            assert (rh, rw) != (h, w)
            grid = enc["image_grid_thw"].to(torch.long)
            assert grid.tolist() == [[1, rh // 14, rw // 14]]
            t = torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1).contiguous()
            resized = ip.resize(t[None], size=SizeDict(shortest_edge=spec["min_pixels"], longest_edge=spec["max_pixels"]), resample=ip.resample, factor=28)[0]
            assert resized.dtype == torch.uint8 and tuple(resized.shape[-2:]) == (rh, rw)
            rgb = resized.permute(1, 2, 0).contiguous()
            assert np.array_equal(patchify_reference(rgb.numpy()), enc["pixel_values"].numpy())
            pil_resized = img.convert("RGB").resize((rw, rh), resample=Image.Resampling.BICUBIC)
            enc_pil = ip_pil(images=[img], return_tensors="pt")
            assert np.abs(patchify_reference(np.asarray(pil_resized)) - enc_pil["pixel_values"].numpy()).max() < 1e-5
            p = f"resize.r{k}."
            tensors[p + "image_grid_thw"] = grid
            # pixel_values are not stored: they are bit-exactly patchify_reference(resized_rgb) (asserted above)
            tensors[p + "resized_rgb"] = rgb
            summary.setdefault("resize", {})[fname] = {"orig_hw": [h, w], "resized_hw": [rh, rw], "grid": grid.tolist()[0],
                                                      "max_abs_u8_diff_torchvision_vs_pil": int((rgb.int() - torch.from_numpy(np.asarray(pil_resized)).int()).abs().max())}

    # ---- RGBA: what compositing on white (qwen-vl-utils) would give -----------------------
    for fname, (h, w, mode) in spec["images"].items():
        if mode == "RGBA":
            img = open_image(case_dir / "images" / fname)
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            comp = Image.alpha_composite(white, img).convert("RGB")
            enc = processor.image_processor(images=[comp], return_tensors="pt")
            enc_drop = processor.image_processor(images=[img], return_tensors="pt")
            tensors["rgba.white_composite.pixel_values"] = enc["pixel_values"].to(torch.float32).contiguous()
            # what transformers does (alpha dropped) is the first image's rows of the score item
            summary["rgba_file"] = fname
            summary["rgba_composite_differs_from_transformers"] = not torch.equal(enc["pixel_values"], enc_drop["pixel_values"])

    # ---- write -------------------------------------------------------------------------
    for k, v in tensors.items():
        assert v.dtype in (torch.float32, torch.int64, torch.float16, torch.uint8), (k, v.dtype)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(case_dir / "tensors.safetensors"), metadata={"format": "pt"})
    summary["n_tensors"] = len(tensors)
    summary["config"] = {
        "vocab_size": spec["vocab_size"],
        "text": spec["text"],
        "vision": spec["vision"],
        "tie_word_embeddings": spec["tie"],
        "min_pixels": spec["min_pixels"],
        "max_pixels": spec["max_pixels"],
    }
    summary["score_lens"] = [{"T": int(it["input_ids"].shape[0]), "prompt_len": it["prompt_len"], "grids": it.get("image_grid_thw", torch.zeros(0, 3)).tolist()} for it in items]
    write_json(case_dir / "summary.json", summary)
    log(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def fixtures_main(argv, doc: str, cases: dict, default_out: Path, build) -> int:
    """The command line of a fixture generator: `--out DIR`, `--case NAME` (repeatable, default all);
    checks the pinned versions and builds each case with `build(name, spec, out_root)`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--case", choices=sorted(cases), action="append")
    args = ap.parse_args(argv)
    assert transformers.__version__ == "5.17.0", transformers.__version__
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.case or list(cases):
        build(name, copy.deepcopy(cases[name]), args.out)
    return 0


def main(argv=None) -> int:
    return fixtures_main(argv, __doc__, CASES, DEFAULT_OUT, build_case)


if __name__ == "__main__":
    sys.exit(main())
