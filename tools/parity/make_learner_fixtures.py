#!/usr/bin/env python3
"""PyTorch reference for ONE learner step (`medrl learner step`) and the fixtures under
crates/learner/tests/fixtures/step/.

How to run (from the repository root, in the venv of tools/parity/requirements.txt plus pyyaml):

    python tools/parity/make_learner_fixtures.py            # all cases
    python tools/parity/make_learner_fixtures.py --case grpo_care_sgd

CPU only, no network. Reuses the tiny models of crates/model/tests/fixtures/parity
(v5_untied, v4_tied; referenced by relative path from each case's case.json, never copied).
The file layout and every formula are described in
crates/learner/tests/fixtures/step/README.md.

The contract reproduced here (one optimizer step from a recorded batch):

    medrl learner step --model DIR --batch GROUPS.jsonl --config RUN.yaml --output DIR2
    -> DIR2/model.safetensors (legacy names) + config/tokenizer files
    -> stdout: {"loss", "grad_norm", "rewards", "advantages", "bonus", "tokens"}

This module is also imported by tools/parity/check_learner_step.py (`reference_step`,
`run_yaml`, reward functions, answer span).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402  (sets offline env vars, silences warnings)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = mf.REPO
PARITY = REPO / "crates/model/tests/fixtures/parity"
DEFAULT_OUT = REPO / "crates/learner/tests/fixtures/step"
EOS_TOKEN = "<|im_end|>"

# ----------------------------------------------------------------------------
# rewards: the released grpo.py (paper-recipe.md §4.3)
# ----------------------------------------------------------------------------

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def format_reward(completion: str) -> float:
    return 1.0 if FORMAT_RE.fullmatch(completion) else 0.0


def clean_text(text: str, exclude_chars=("\n", "\r")) -> str:
    matches = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if matches:
        text = matches[-1]
    for ch in exclude_chars:
        text = re.sub(r"(?<=\s)" + re.escape(ch), "", text)
        text = re.sub(r"(?<!\s)" + re.escape(ch), " ", text)
    return text.strip().rstrip(".").lower()


def accuracy_reward(completion: str, sol: str) -> float:
    reward = 0.0
    try:
        m = re.search(r"<answer>(.*?)</answer>", sol)
        ground_truth = m.group(1).strip() if m else sol.strip()
        matches = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
        student = matches[-1].strip() if matches else completion.strip()
        if clean_text(student) == clean_text(ground_truth):
            reward = 1.0
    except Exception:  # noqa: BLE001  (the release leaves the reward at 0)
        reward = 0.0
    return reward


# ----------------------------------------------------------------------------
# GRPO-CARE answer span: get_thinking_answer_masks of grpo_trainer_ref_ema.py (§4.4)
# ----------------------------------------------------------------------------


def released_answer_index(full_tokens: list[str], prompt_len: int) -> int:
    """The released scan, literally (quirks included), on the token strings of
    prompt + completion (padding removed). Returns the answer index in completion
    coordinates; len(completion) when no `<answer>` token is found in the completion.

    Quirks kept: the loop starts at i = 0, i.e. token 0, then the last token, then
    backwards; the window slice `[-i-1:-i+2]` is empty for i = 0, 1, 2, so the first
    and the last two tokens can never match."""
    toks = full_tokens
    n = len(toks)
    loc = None
    for i in range(n):
        if "answer" in toks[-i]:
            expanded = "".join(toks[-i - 1 : -i + 2])
            if "<answer>" in expanded:
                loc = -i
                break
    if loc is not None:
        cot_only = toks[: loc + 1]
        idx = n + loc if len(cot_only) > prompt_len else n
    else:
        idx = n
    return idx - prompt_len


def answer_span(answer_index: int, eos_idx: int, completion_len: int) -> tuple[int, int]:
    """Span [start, end) of completion positions t with a < t < max(a + 1, eos_idx - 3)."""
    start = answer_index + 1
    end = max(answer_index + 1, eos_idx - 3)
    end = min(end, completion_len)
    start = min(start, end)
    return start, end


# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------


def fmt_float(x: float) -> str:
    """A YAML float that both PyYAML (YAML 1.1: needs a dot, and a signed exponent) and
    serde_yaml read: 0.05, 5.0, 1.0e-3."""
    x = float(x)
    if x == 0.0 or 1e-2 <= abs(x) < 1e4:
        s = repr(x)
        assert "e" not in s
        return s
    m, e = f"{x:.6e}".split("e")
    m = m.rstrip("0")
    m = m + "0" if m.endswith(".") else m
    return f"{m}e{int(e):+d}"


def run_yaml(algorithm: str, optimizer: dict, max_grad_norm: float = 5.0, care: dict | None = None) -> str:
    """RUN.yaml text with exactly the keys the Rust side parses (unknown keys rejected)."""
    care = dict({"bonus_coefficient": 0.5, "confidence_upper_bound": 0.95, "consistency_margin": 0.01, "accuracy_threshold": 0.1}, **(care or {}))
    if optimizer["kind"] == "sgd":
        opt = f"{{kind: sgd, lr: {fmt_float(optimizer['lr'])}}}"
    elif optimizer["kind"] == "adamw":
        opt = (
            f"{{kind: adamw, lr: {fmt_float(optimizer['lr'])}, beta1: {fmt_float(optimizer['beta1'])}, "
            f"beta2: {fmt_float(optimizer['beta2'])}, eps: {fmt_float(optimizer['eps'])}, "
            f"weight_decay: {fmt_float(optimizer['weight_decay'])}}}"
        )
    else:
        raise ValueError(optimizer)
    return (
        "algorithm:\n"
        f"  name: {algorithm}\n"
        "  rewards: {weights: {format: 1.0, accuracy: 1.0, med_vl_thinker: 0.0, eval_kit: 0.0}, accuracy_gold: answer}\n"
        "  advantage: {kind: grpo, std_eps: 1.0e-4, drop_uniform_groups: false}\n"
        "  loss: {clip_low: 0.2, clip_high: 0.2, aggregation: seq-mean-token-mean, max_completion_length: 2048, beta: 0.0, kl_estimator: k3}\n"
        f"  care: {{bonus_coefficient: {fmt_float(care['bonus_coefficient'])}, confidence_upper_bound: {fmt_float(care['confidence_upper_bound'])}, "
        f"consistency_margin: {fmt_float(care['consistency_margin'])}, accuracy_threshold: {fmt_float(care['accuracy_threshold'])}}}\n"
        "  ema: {decay: 0.995, every: 10}\n"
        "learner:\n"
        "  trainable: all\n"
        f"  optimizer: {opt}\n"
        "  schedule: {kind: constant, warmup_steps: 0}\n"
        "  total_steps: 1\n"
        f"  max_grad_norm: {fmt_float(max_grad_norm)}\n"
        "  gradient_checkpointing: true\n"
        "  micro_batch_sequences: 4\n"
    )


def parse_run(text: str) -> dict:
    cfg = yaml.safe_load(text)
    a, ln = cfg["algorithm"], cfg["learner"]
    assert a["name"] in ("grpo", "grpo_care", "sft"), a["name"]
    w = a["rewards"]["weights"]
    assert w.get("med_vl_thinker", 0.0) == 0.0 and w.get("eval_kit", 0.0) == 0.0, "only format/accuracy rewards are modelled"
    assert a["rewards"]["accuracy_gold"] == "answer"
    assert a["advantage"]["kind"] == "grpo" and not a["advantage"]["drop_uniform_groups"]
    assert a["loss"]["aggregation"] == "seq-mean-token-mean" and float(a["loss"]["beta"]) == 0.0
    assert ln["trainable"] == "all"
    assert ln["schedule"]["kind"] == "constant" and int(ln["schedule"]["warmup_steps"]) == 0
    return cfg


# ----------------------------------------------------------------------------
# model / batch
# ----------------------------------------------------------------------------


def load_policy(model_dir: Path, dtype=torch.float32):
    model = mf.Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = model.to(dtype)
    model.eval()  # no dropout anywhere in Qwen2.5-VL; eval() only to be explicit
    processor = mf.AutoProcessor.from_pretrained(model_dir)
    if processor.chat_template is None:  # 4.x layout: template only in tokenizer_config.json
        processor.chat_template = processor.tokenizer.chat_template
    return model, processor


def read_groups(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_batch(processor, groups: list[dict], base_dir: Path) -> list[dict]:
    """One entry per group: prompt encoding + per-completion ids."""
    tok = processor.tokenizer
    out = []
    for g in groups:
        pil = []
        for p in g["images"]:
            img = mf.open_image(base_dir / p)
            assert img.mode == "RGB", (p, img.mode)
            pil.append(img)
        enc = mf.encode(processor, pil, g["prompt"], None)
        comps = []
        for c in g["completions"]:
            ids = tok(c, add_special_tokens=False)["input_ids"]
            assert len(ids) > 0, "empty completion"
            comps.append(torch.tensor(ids, dtype=torch.long))
        out.append({"enc": enc, "completions": comps})
    return out


def first_eos(ids: list[int], eos_id: int) -> int | None:
    for i, t in enumerate(ids):
        if t == eos_id:
            return i
    return None


# ----------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------


def reference_step(model_dir: Path, groups_path: Path, run_text: str, dtype=torch.float32) -> dict:
    """Apply one optimizer step as specified (see the module docstring / README).

    Returns {"expected": the JSON line's fields, "new": {legacy name: tensor},
    "old": {legacy name: tensor}, "debug": {...}}."""
    cfg = parse_run(run_text)
    alg = cfg["algorithm"]
    algo = alg["name"]
    weights = alg["rewards"]["weights"]
    care = alg["care"]
    clip_low, clip_high = float(alg["loss"]["clip_low"]), float(alg["loss"]["clip_high"])
    std_eps = float(alg["advantage"]["std_eps"])
    opt_cfg = cfg["learner"]["optimizer"]
    max_grad_norm = float(cfg["learner"]["max_grad_norm"])

    model, processor = load_policy(model_dir, dtype)
    tok = processor.tokenizer
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    assert tok.eos_token_id == eos_id
    pad_id = tok.pad_token_id
    groups = read_groups(groups_path)
    batch = encode_batch(processor, groups, groups_path.parent)

    params = [(n, p) for n, p in model.named_parameters()]  # tied lm_head appears once
    old = {mf.v5_saved_name(n): p.detach().to(torch.float32).clone() for n, p in params}

    # ---- forward: per-token log-probs of every completion (grad kept) ------------------
    seqs = []  # flat list over groups, completions
    for gi, (g, b) in enumerate(zip(groups, batch)):
        enc = b["enc"]
        for ci, cids in enumerate(b["completions"]):
            item = {
                "input_ids": torch.cat([enc["prompt_ids"], cids]),
                "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(cids, dtype=enc["mm_token_type_ids"].dtype)]),
            }
            if "pixel_values" in enc:
                item["pixel_values"] = enc["pixel_values"].to(dtype)
                item["image_grid_thw"] = enc["image_grid_thw"]
            logits = mf.forward_item(model, item)
            lp_all = torch.log_softmax(logits.to(dtype), dim=-1)
            P = enc["prompt_len"]
            lp = lp_all[P - 1 : item["input_ids"].shape[0] - 1].gather(-1, cids[:, None])[:, 0]
            ids = cids.tolist()
            e = first_eos(ids, eos_id)
            n_mask = len(ids) if e is None else e + 1
            mask = torch.zeros(len(ids), dtype=dtype)
            mask[:n_mask] = 1
            seqs.append({"group": gi, "index": ci, "ids": ids, "lp": lp, "mask": mask, "n_mask": n_mask, "eos": e, "prompt_ids": enc["prompt_ids"].tolist(), "prompt_len": P})

    # ---- rewards, CARE bonus, advantages --------------------------------------------------
    debug_rows = []
    rewards_out, adv_out, bonus_out = [], [], []
    adv_flat = []
    if algo in ("grpo", "grpo_care"):
        for gi, g in enumerate(groups):
            rows = [s for s in seqs if s["group"] == gi]
            fmt, acc, conf_raw, spans = [], [], [], []
            for s in rows:
                # the release scores the decoded completion (special tokens skipped)
                text = tok.decode(s["ids"], skip_special_tokens=True)
                s["reward_text"] = text
                fmt.append(format_reward(text))
                acc.append(accuracy_reward(text, g["answer"]))
                # answer span on prompt + completion token strings (pads removed; none here)
                full = [t for t in s["prompt_ids"] + s["ids"] if t != pad_id]
                assert len(full) == len(s["prompt_ids"]) + len(s["ids"]), "pad token inside a sequence"
                a = released_answer_index(tok.convert_ids_to_tokens(full), s["prompt_len"])
                eos_idx = s["eos"] if s["eos"] is not None else len(s["ids"])
                st, en = answer_span(a, eos_idx, len(s["ids"]))
                spans.append((st, en))
                s["answer_index"] = a if a < len(s["ids"]) else None
                # reference model = the initial policy -> reference log-probs = policy log-probs
                ref_lp = s["lp"].detach().to(torch.float32).tolist()
                tot = sum(float(ref_lp[t]) for t in range(st, en))  # f64, left to right
                conf_raw.append(math.exp(tot / ((en - st) + 1e-6)))
            bonus = [0.0] * len(rows)
            accurate = [False] * len(rows)
            confident = [False] * len(rows)
            conf = [min(c, float(care["confidence_upper_bound"])) for c in conf_raw]
            mean_sel = None
            margin_info = None
            if algo == "grpo_care":
                mean_acc = sum(acc) / len(acc)
                accurate = [x > float(care["accuracy_threshold"]) and x >= mean_acc for x in acc]
                sel = [c for c, ok in zip(conf, accurate) if ok]
                if sel:
                    mean_sel = sum(sel) / len(sel)
                    thr = mean_sel - float(care["consistency_margin"])
                    confident = [c >= thr for c in conf]
                    margin_info = min(abs(c - thr) for c in conf)
                bonus = [x * float(care["bonus_coefficient"]) if (ok and cf) else 0.0 for x, ok, cf in zip(acc, accurate, confident)]
            total = [float(weights["format"]) * f + float(weights["accuracy"]) * x + b for f, x, b in zip(fmt, acc, bonus)]
            n = len(total)
            if all(r == total[0] for r in total):
                adv = [0.0] * n
            else:
                mean = sum(total) / n
                var = sum((r - mean) ** 2 for r in total) / (n - 1)
                scale = math.sqrt(var) + std_eps
                adv = [(r - mean) / scale for r in total]
            rewards_out.append(total)
            adv_out.append(adv)
            bonus_out.append(bonus)
            adv_flat.extend(adv)
            for k, s in enumerate(rows):
                debug_rows.append(
                    {
                        "group": gi,
                        "index": k,
                        "completion_ids": s["ids"],
                        "masked_tokens": s["n_mask"],
                        "reward_text": s["reward_text"],
                        "format": fmt[k],
                        "accuracy": acc[k],
                        "answer_index": s["answer_index"],
                        "answer_span": list(spans[k]) if s["answer_index"] is not None else None,
                        "answer_span_tokens": tok.convert_ids_to_tokens(s["ids"][spans[k][0] : spans[k][1]]),
                        "confidence_raw": conf_raw[k],
                        "confidence": conf[k],
                        "accurate": accurate[k],
                        "confident": confident[k],
                        "mean_selected_confidence": mean_sel,
                        "min_distance_to_confidence_threshold": margin_info,
                        "token_logprobs": [float(x) for x in s["lp"].detach().to(torch.float32)],
                    }
                )

    # ---- loss --------------------------------------------------------------------------------
    tokens = int(sum(s["n_mask"] for s in seqs))
    ratio_info = []
    if algo == "sft":
        num = sum((s["lp"] * s["mask"]).sum() for s in seqs)
        loss = -num / tokens
        for s in seqs:
            debug_rows.append({"group": s["group"], "index": s["index"], "completion_ids": s["ids"], "masked_tokens": s["n_mask"], "token_logprobs": [float(x) for x in s["lp"].detach().to(torch.float32)]})
    else:
        seq_losses = []
        for s, A in zip(seqs, adv_flat):
            g = groups[s["group"]]
            sl = g.get("sampling_logprobs")
            if sl is None:
                old_lp = s["lp"].detach()
            else:
                old_lp = torch.tensor(sl[s["index"]], dtype=torch.float32).to(dtype)
                assert old_lp.shape == s["lp"].shape, (old_lp.shape, s["lp"].shape)
            A_t = torch.tensor(A, dtype=dtype)
            ratio = torch.exp(s["lp"] - old_lp)
            pg1 = ratio * A_t
            pg2 = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * A_t
            per_tok = -torch.minimum(pg1, pg2)
            seq_losses.append((per_tok * s["mask"]).sum() / s["mask"].sum())
            if sl is not None:
                r = ratio.detach().to(torch.float64)
                m = s["mask"].bool()
                clipped = ((A > 0) & (r > 1 + clip_high)) | ((A < 0) & (r < 1 - clip_low))
                dist = torch.minimum((r - (1 - clip_low)).abs(), (r - (1 + clip_high)).abs())
                ratio_info.append({"group": s["group"], "index": s["index"], "clipped_tokens": int((clipped & m).sum()), "masked_tokens": int(m.sum()), "min_ratio_distance_to_clip_bound": float(dist[m].min())})
        loss = torch.stack(seq_losses).mean()

    model.zero_grad(set_to_none=True)
    loss.backward()
    plist = [p for _, p in params]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"parameters without gradient (every case needs images): {missing[:5]}"
    grad_norm = torch.nn.utils.clip_grad_norm_(plist, max_grad_norm)
    lr = float(opt_cfg["lr"])
    if opt_cfg["kind"] == "sgd":
        opt = torch.optim.SGD(plist, lr=lr)
    else:
        opt = torch.optim.AdamW(
            plist,
            lr=lr,
            betas=(float(opt_cfg["beta1"]), float(opt_cfg["beta2"])),
            eps=float(opt_cfg["eps"]),
            weight_decay=float(opt_cfg["weight_decay"]),
        )
    opt.step()
    new = {mf.v5_saved_name(n): p.detach().to(torch.float32).clone() for n, p in params}

    expected = {
        "loss": float(loss.detach()),
        "grad_norm": float(grad_norm),
        "rewards": rewards_out,
        "advantages": adv_out,
        "bonus": bonus_out if algo == "grpo_care" else ([[0.0] * len(r) for r in rewards_out] if algo == "grpo" else []),
        "tokens": tokens,
    }
    gn = float(grad_norm)
    debug = {
        "completions": debug_rows,
        "clip_coef": min(1.0, max_grad_norm / (gn + 1e-6)),
        "clipped": gn > max_grad_norm,
        "lr": lr,
        "ratios": ratio_info,
        "update_l2": {k: float((new[k].double() - old[k].double()).norm()) for k in sorted(new)},
    }
    return {"expected": expected, "new": new, "old": old, "debug": debug}


def min_update(result: dict) -> tuple[str, float]:
    """Smallest per-tensor update norm (to check that every tensor moved)."""
    k = min(result["debug"]["update_l2"], key=result["debug"]["update_l2"].get)
    return k, result["debug"]["update_l2"][k]


def compare_precision(r32: dict, r64: dict) -> dict:
    """How far the f32 reference is from the same computation in f64 (an estimate of
    the noise an independent f32 implementation will show)."""
    wdiff = max(float((r32["new"][k].double() - r64["new"][k].double()).abs().max()) for k in r32["new"])
    e32, e64 = r32["expected"], r64["expected"]
    same_rewards = e32["rewards"] == e64["rewards"] and e32["bonus"] == e64["bonus"]
    adv = max([abs(a - b) for ga, gb in zip(e32["advantages"], e64["advantages"]) for a, b in zip(ga, gb)] or [0.0])
    return {
        "max_abs_weight_diff": wdiff,
        "loss_abs_diff": abs(e32["loss"] - e64["loss"]),
        "grad_norm_rel_diff": abs(e32["grad_norm"] - e64["grad_norm"]) / max(1e-30, abs(e64["grad_norm"])),
        "rewards_equal": same_rewards,
        "max_adv_diff": adv,
        "loss_f64": e64["loss"],
        "grad_norm_f64": e64["grad_norm"],
    }


# ----------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------

V5 = "v5_untied"
V4 = "v4_tied"
SGD = {"kind": "sgd", "lr": 0.5}
ADAMW = {"kind": "adamw", "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-2, "weight_decay": 0.1}
IM_END = "<|im_end|>"
R1V_HINT = " Output the thinking process in <think> </think> and the final answer in <answer> </answer> tags."

# images: name -> (H, W); RGB, sides multiples of 28, inside both models' [min, max] pixels
IMAGES = {"a_56x84.png": (56, 84), "b_84x56.png": (84, 56), "c_56x56.png": (56, 56)}

CASES = {
    "grpo_sgd": {
        "model": V5,
        "algorithm": "grpo",
        "optimizer": SGD,
        "max_grad_norm": 5.0,
        "store": "subset",
        "groups": [
            {
                "images": ["a_56x84.png"],
                "prompt": "What is shown? A. mass B. normal",
                "answer": "A",
                "completions": [
                    "<think> A round mass. </think><answer>A</answer>" + IM_END,
                    "<think> It looks normal. </think><answer>B</answer>" + IM_END,
                    "<think> A mass </think>\n<answer> a. </answer>",
                    "The answer is A.",
                ],
            },
            {
                "images": ["b_84x56.png", "c_56x56.png"],
                "prompt": "Is the liver normal?" + R1V_HINT,
                "answer": "normal",
                "completions": [
                    "<think> The liver is normal. </think><answer>normal</answer>" + IM_END,
                    "<think> A lesion. </think> <answer>abnormal</answer>",
                    "normal" + IM_END,
                ],
            },
        ],
    },
    "grpo_care_sgd": {
        "model": V5,
        "algorithm": "grpo_care",
        "optimizer": SGD,
        "max_grad_norm": 5.0,
        "store": "all",
        "groups": [
            {
                # accurate: 0, 2, 3; only 2 (no tags -> empty span -> confidence 1 -> 0.95) is confident
                "images": ["a_56x84.png"],
                "prompt": "Which option fits the image? A. normal B. mass",
                "answer": "B",
                "completions": [
                    "<think> The image shows a round mass. </think><answer>B</answer>" + IM_END,
                    "<think> Looks normal. </think><answer>A</answer>" + IM_END,
                    "B",
                    "<think> round mass </think> <answer> b. </answer>",
                ],
            },
            {
                # accurate: 0, 2 (both tagged, similar confidence -> both confident, bonus 0.5)
                "images": ["b_84x56.png", "c_56x56.png"],
                "prompt": "Is the scan normal?" + R1V_HINT,
                "answer": "<answer>normal</answer>",
                "completions": [
                    "<think> The scan is clean. </think><answer>normal</answer>" + IM_END,
                    "<think> A nodule. </think><answer>abnormal</answer>" + IM_END,
                    "<think> Clean.</think>\n<answer>Normal.</answer>",
                    "abnormal" + IM_END,
                ],
            },
            {
                # all wrong but well formatted: all rewards 1.0 -> advantages 0, no bonus
                "images": ["c_56x56.png"],
                "prompt": "Is there a fracture? Answer yes or no.",
                "answer": "yes",
                "completions": [
                    "<think> The bone is intact. </think><answer>no</answer>" + IM_END,
                    "<think> Intact cortex. </think><answer>No</answer>",
                    "<think> no break </think>\n<answer>no.</answer>" + IM_END,
                ],
            },
        ],
    },
    "grpo_care_adamw": {
        "model": V4,
        "algorithm": "grpo_care",
        "optimizer": ADAMW,
        "max_grad_norm": 5.0,
        "store": "all",
        "groups": [
            {
                "images": ["a_56x84.png"],
                "prompt": "Which organ is visible? A. liver B. kidney C. heart",
                "answer": "C",
                "completions": [
                    "<think> The heart is enlarged. </think><answer>C</answer>" + IM_END,
                    "c" + IM_END,
                    "<think> The kidney. </think><answer>B</answer>" + IM_END,
                    "<think> heart </think><answer>A</answer><answer>C</answer>",
                ],
            },
            {
                "images": ["b_84x56.png"],
                "prompt": "What is the modality?" + R1V_HINT,
                "answer": "ultrasound",
                "completions": [
                    "<think> Ultrasound image. </think><answer>ultrasound</answer>" + IM_END,
                    "<think> A CT scan. </think><answer>ct</answer>" + IM_END,
                    "<think> It is an MRI. </think>\n<answer>MRI</answer>",
                    # a trailing opening tag: the released scan never looks at the last two
                    # tokens, so the span starts after the FIRST <answer> and runs to len - 3
                    "<think> maybe </think><answer>ultrasound</answer><answer>",
                ],
            },
        ],
    },
    "grpo_offpolicy_sgd": {
        "model": V4,
        "algorithm": "grpo",
        "optimizer": SGD,
        "max_grad_norm": 5.0,
        "store": "subset",
        # per-token offsets d: sampling_logprob = f32(logprob + d), ratio = exp(-d)
        "offpolicy": True,
        "groups": [
            {
                "images": ["a_56x84.png"],
                "prompt": "Where is the lesion? A. liver B. lung",
                "answer": "B",
                "completions": [
                    "<think> The lesion is in the lung. </think><answer>B</answer>" + IM_END,
                    "<think> liver </think><answer>A</answer>" + IM_END,
                    "<think> lung </think><answer>b</answer>",
                ],
            },
            {
                "images": ["c_56x56.png"],
                "prompt": "How many kidneys are seen?",
                "answer": "2",
                "completions": [
                    "<think> Two kidneys are seen. </think><answer>2</answer>" + IM_END,
                    "<think> One kidney. </think><answer>1</answer>" + IM_END,
                    "2",
                ],
            },
        ],
    },
    "sft_sgd": {
        "model": V5,
        "algorithm": "sft",
        "optimizer": SGD,
        "max_grad_norm": 5.0,
        "store": "subset",
        "groups": [
            {
                "images": ["a_56x84.png"],
                "prompt": "Describe the image.",
                "answer": "mass",
                "completions": [
                    "<think> A round mass in the lung. </think><answer>mass</answer>" + IM_END,
                    "The image shows a small round mass." + IM_END,
                    "<think> mass </think><answer>mass</answer>",
                ],
            },
            {
                "images": ["b_84x56.png", "c_56x56.png"],
                "prompt": "Compare the two images.",
                "answer": "second",
                "completions": [
                    "The second image shows a nodule." + IM_END,
                    "<think> The first is normal. </think>\n<answer>second</answer>" + IM_END,
                ],
            },
        ],
    },
    "sft_adamw": {
        "model": V4,
        "algorithm": "sft",
        "optimizer": ADAMW,
        "max_grad_norm": 5.0,
        "store": "subset",
        "groups": [
            {
                "images": ["c_56x56.png"],
                "prompt": "What is the modality of this image?",
                "answer": "ultrasound",
                "completions": [
                    "<think> Grainy fan shape. </think><answer>ultrasound</answer>" + IM_END,
                    "It is an ultrasound image." + IM_END,
                    "ultrasound",
                ],
            },
            {
                "images": ["a_56x84.png"],
                "prompt": "Is there evidence of a fracture?",
                "answer": "no",
                "completions": [
                    "<think> The cortex is intact. </think><answer>no</answer>" + IM_END,
                    "No fracture is seen." + IM_END,
                ],
            },
        ],
    },
}

# tensors stored for "subset" cases (plus every 1-D tensor); "{L}" = last text layer,
# "{V}" = last vision block
SUBSET = [
    "visual.blocks.0.attn.qkv.weight",
    "visual.blocks.{V}.mlp.down_proj.weight",
    "visual.merger.mlp.2.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.{L}.mlp.down_proj.weight",
    "model.embed_tokens.weight",
    "lm_head.weight",
]

OFFSETS = [0.5, -0.5, 0.1, -0.1, 0.3, -0.3, 0.0, 0.02]  # ratio exp(-d): 0.61, 1.65, 0.90, 1.11, 0.74, 1.35, 1, 0.98


def model_rel(case_dir: Path, model_name: str) -> str:
    return os.path.relpath(PARITY / model_name / "model", case_dir)


def subset_names(names: list[str], model_dir: Path) -> list[str]:
    cfg = json.loads((model_dir / "config.json").read_text())
    tc = cfg.get("text_config", cfg)
    vc = cfg["vision_config"]
    want = {s.replace("{L}", str(tc["num_hidden_layers"] - 1)).replace("{V}", str(vc["depth"] - 1)) for s in SUBSET}
    if "lm_head.weight" in names:  # untied: lm_head is stored, the (sparse) embedding is not
        want.discard("model.embed_tokens.weight")
    return sorted(n for n in names if n in want or n.endswith(".bias") or "norm" in n or "ln_q" in n)


def make_offpolicy_logprobs(case_dir: Path, spec: dict, model_dir: Path) -> None:
    """Fill groups' sampling_logprobs from the initial policy's log-probs plus fixed offsets."""
    model, processor = load_policy(model_dir)
    batch = encode_batch(processor, spec["groups"], case_dir)
    k = 0
    for g, b in zip(spec["groups"], batch):
        enc = b["enc"]
        rows = []
        for cids in b["completions"]:
            item = {
                "input_ids": torch.cat([enc["prompt_ids"], cids]),
                "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(cids)]),
            }
            if "pixel_values" in enc:
                item["pixel_values"] = enc["pixel_values"]
                item["image_grid_thw"] = enc["image_grid_thw"]
            with torch.no_grad():
                lp = mf.completion_logprobs(mf.forward_item(model, item), item["input_ids"], enc["prompt_len"])
            d = torch.tensor([OFFSETS[(k + t) % len(OFFSETS)] for t in range(len(lp))], dtype=torch.float32)
            k += 3
            old = (lp + d).to(torch.float32)
            rows.append([float(x) for x in old])  # f32 values, written as their exact f64 repr
        g["sampling_logprobs"] = rows


def build_case(name: str, spec: dict, out_root: Path, log=print) -> dict:
    case_dir = out_root / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    (case_dir / "images").mkdir(parents=True)
    model_dir = PARITY / spec["model"] / "model"
    rng = np.random.default_rng(sum(map(ord, name)))
    used = sorted({p for g in spec["groups"] for p in g["images"]})
    for fname in used:
        h, w = IMAGES[fname]
        mf.save_png(mf.make_image(rng, h, w, "RGB", noise=1.0), case_dir / "images" / fname)
    groups = copy.deepcopy(spec["groups"])
    for g in groups:
        g["images"] = [f"images/{p}" for p in g["images"]]
    spec = dict(spec, groups=groups)
    if spec.get("offpolicy"):
        make_offpolicy_logprobs(case_dir, spec, model_dir)
    mf.dump_jsonl(case_dir / "groups.jsonl", groups)
    run_text = run_yaml(spec["algorithm"], spec["optimizer"], spec["max_grad_norm"])
    (case_dir / "run.yaml").write_text(run_text, encoding="utf-8")
    assert yaml.safe_load(run_text)  # parses

    r32 = reference_step(model_dir, case_dir / "groups.jsonl", run_text, torch.float32)
    r64 = reference_step(model_dir, case_dir / "groups.jsonl", run_text, torch.float64)
    prec = compare_precision(r32, r64)
    assert prec["rewards_equal"], "f32 and f64 disagree on rewards (a CARE decision is too close to its threshold)"

    names = sorted(r32["new"])
    stored = names if spec["store"] == "all" else subset_names(names, model_dir)
    save_file({k: r32["new"][k].contiguous() for k in stored}, str(case_dir / "expected_weights.safetensors"), metadata={"format": "pt"})
    exp = dict(r32["expected"])
    exp["debug"] = dict(r32["debug"])
    exp["debug"]["weights_stored"] = spec["store"]
    exp["debug"]["stored_tensors"] = len(stored)
    exp["debug"]["f64_check"] = prec
    mf.write_json(case_dir / "expected.json", exp)
    case_json = {
        "model": model_rel(case_dir, spec["model"]),
        "algorithm": spec["algorithm"],
        "optimizer": spec["optimizer"]["kind"],
        "tied": spec["model"] == V4,
        "weights": spec["store"],
        "n_params": sum(v.numel() for v in r32["new"].values()),
        "tolerances": {"rewards_abs": 1e-9, "advantages_abs": 1e-9, "loss_rel": 1e-5, "loss_abs": 1e-6, "grad_norm_rel": 1e-5, "weights_abs": 1e-5, "update_l2_rel": 1e-4},
    }
    mf.write_json(case_dir / "case.json", case_json)
    k, v = min_update(r32)
    e = r32["expected"]
    log(
        f"{name}: loss {e['loss']:.6g} grad_norm {e['grad_norm']:.6g} (clipped={r32['debug']['clipped']}) tokens {e['tokens']} "
        f"rewards {e['rewards']} bonus {e['bonus']}\n   adv {[[round(a, 4) for a in g] for g in e['advantages']]}\n"
        f"   smallest update {k} {v:.3g}; f64 check {json.dumps(prec)}"
    )
    for row in r32["debug"]["completions"]:
        if "confidence" in row:
            log(f"   g{row['group']}c{row['index']} fmt {row['format']} acc {row['accuracy']} span {row['answer_span']} conf {row['confidence']:.5f} acc? {row['accurate']} conf? {row['confident']} margin {row['min_distance_to_confidence_threshold']}")
    for ri in r32["debug"]["ratios"]:
        log(f"   ratios {ri}")
    return exp


def main(argv=None) -> int:
    return mf.fixtures_main(argv, __doc__, CASES, DEFAULT_OUT, build_case)


if __name__ == "__main__":
    sys.exit(main())
