#!/usr/bin/env python3
"""Held-out parity check of the `medrl` binary against transformers 5.17.

For each case this builds a FRESH random tiny Qwen2.5-VL (random sizes, random
config layout transformers 4.x or 5.x, random tied / untied embeddings, random
safetensors dtype and sharding for the 4.x layout, a freshly trained tiny
byte-level BPE tokenizer with random vocabulary size, random images whose sides
are multiples of 28, sometimes several images per prompt, sometimes none),
saves it to a temporary directory, and then

  (a) runs  medrl score --model DIR --input IN.jsonl --output OUT.jsonl
      and compares completion_token_ids exactly and token_logprobs within
      --atol (default 1e-4) with transformers (f32, eager attention);
  (b) runs  medrl generate --model DIR --image P [--image P]... --prompt TEXT
            --greedy --max-new-tokens N --json
      and compares token_ids with transformers greedy `generate`.

Usage (from the repository root, with the venv of tools/parity/requirements.txt):

    python tools/parity/check_cli.py --medrl target/release/medrl [--cases N] [--seed S]

Other options: --atol, --keep (keep the temp dirs), --workdir DIR,
--medrl-args "..." (extra arguments appended to every medrl call, e.g.
"--device cpu"), --modes RGB,L,P,RGBA (PIL modes of the random PNGs),
--strict-logprobs (also fail on generate logprob differences),
--dry-run (build the cases and the transformers references only; no medrl).

Contracts assumed (from the medrl CLI spec):
  score input line : {"images": [paths relative to IN.jsonl's folder], "prompt": str, "completion": str}
  score output line: the input object plus "completion_token_ids" (ints) and "token_logprobs" (floats)
  generate stdout  : one JSON object per sample per line: {"text": ..., "token_ids": [...], "logprobs": [...]}
The prompt is ONE user turn (images first, then the text) rendered with the
model's chat template (default system prompt) and add_generation_prompt=True;
the completion is tokenised without special tokens and appended.
Greedy comparison: a trailing eos (<|im_end|>, or any id in generation_config
eos_token_id) is ignored on both sides; if the reference has a near-tie
(top-2 logit margin < --tie-margin) at some step, tokens from that step on are
not compared (reported as a warning).

Prints one line per case and a final line "N passed, M failed"; the exit code is
0 when everything passed, 1 when something failed, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402  (sets offline env vars, silences warnings)
import numpy as np  # noqa: E402
import torch  # noqa: E402

WORDS = (
    "the image shows a small round mass in left right lung liver kidney brain heart bone scan "
    "x-ray ct mri ultrasound lesion normal abnormal fracture nodule patient with cough fever "
    "which what where is are there evidence of organ visible answer yes no option letter"
).split()
EXOTIC = ["café", "cafe\u0301", "≈ 3 cm", "12 mm", "it's", "naïve", "résumé", "α-β", "  two  spaces", "line\nbreak", "(A)", "50%"]


def rand_text(rng: np.random.Generator, lo: int, hi: int) -> str:
    words = [str(rng.choice(WORDS)) for _ in range(int(rng.integers(lo, hi + 1)))]
    if rng.random() < 0.5:
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(EXOTIC)))
    s = " ".join(words)
    s = s[0].upper() + s[1:]
    return s + str(rng.choice(["?", ".", "?", ":"]))


def rand_completion(rng: np.random.Generator) -> str:
    think = rand_text(rng, 2, 8)
    ans = str(rng.choice(["A", "B", "C", "D", "yes", "no", "normal", "2", "left lung"]))
    sep = str(rng.choice([" ", "\n", ""]))
    return f"<think> {think} </think>{sep}<answer>{ans}</answer>"


def rand_mrope_section(rng: np.random.Generator, half: int) -> list[int]:
    # three positive parts summing to half (head_dim / 2)
    a = int(rng.integers(1, half - 1))
    b = int(rng.integers(1, half - a))
    parts = [a, b, half - a - b]
    rng.shuffle(parts)
    return [int(x) for x in parts]


def rand_spec(rng: np.random.Generator) -> dict:
    heads = int(rng.choice([2, 4, 6]))
    kv = int(rng.choice([d for d in (1, 2, 3, 6) if heads % d == 0 and d <= heads]))
    head_dim = int(rng.choice([8, 12, 16]))
    vheads = int(rng.choice([1, 2, 4]))
    vhead_dim = int(rng.choice([8, 12, 16]))  # multiple of 4 for the 2-D vision rope
    depth = int(rng.integers(1, 5))
    full = sorted(int(i) for i in rng.choice(depth, size=int(rng.integers(0, depth + 1)), replace=False))
    bpe = int(rng.integers(300, 381))
    layout = str(rng.choice(["v4", "v5"]))
    spec = {
        "seed": int(rng.integers(0, 2**31 - 1)),
        "bpe_vocab": bpe,
        "vocab_size": bpe + 8 + int(rng.integers(0, 25)),
        "tie": bool(rng.random() < 0.5),
        "layout": layout,
        "init_std": float(rng.choice([0.1, 0.15, 0.2])),
        "embed_std": float(rng.choice([0.15, 0.2, 0.3])),
        "text": {
            "layers": int(rng.integers(1, 4)),
            "hidden": heads * head_dim,
            "heads": heads,
            "kv_heads": kv,
            "intermediate": int(rng.integers(4, 21)) * 8,
            "mrope_section": rand_mrope_section(rng, head_dim // 2),
            "rope_theta": float(rng.choice([10000.0, 1000000.0])),
        },
        "vision": {
            "depth": depth,
            "hidden": vheads * vhead_dim,
            "heads": vheads,
            "intermediate": int(rng.integers(4, 17)) * 8,
            "window_size": int(rng.choice([28, 56, 84, 112])),
            "fullatt_block_indexes": full,
        },
        "min_pixels": int(rng.choice([784, 3136])),
        "max_pixels": 28 * 28 * int(rng.integers(48, 129)),
    }
    if layout == "v4":
        spec["v4_dtype"] = str(rng.choice(["bfloat16", "float32"]))
        spec["v4_shards"] = int(rng.choice([1, 2, 3]))
    return spec


def describe(spec: dict) -> str:
    t, v = spec["text"], spec["vision"]
    lay = spec["layout"] + (f"/{spec['v4_dtype']}/{spec['v4_shards']}sh" if spec["layout"] == "v4" else "")
    return (
        f"{lay} {'tied' if spec['tie'] else 'untied'} vocab={spec['vocab_size']} "
        f"text(L{t['layers']} H{t['hidden']} h{t['heads']}/{t['kv_heads']} I{t['intermediate']} mrope{t['mrope_section']} "
        f"theta{t['rope_theta']:g}) vision(D{v['depth']} H{v['hidden']} h{v['heads']} I{v['intermediate']} "
        f"win{v['window_size']} full{v['fullatt_block_indexes']}) pixels[{spec['min_pixels']},{spec['max_pixels']}]"
    )


def rand_image_size(rng: np.random.Generator, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    for _ in range(1000):
        h = 28 * int(rng.integers(1, 9))
        w = 28 * int(rng.integers(1, 9))
        if min_pixels <= h * w <= max_pixels and max(h, w) / min(h, w) <= 200:
            return h, w
    raise RuntimeError("no image size fits")


class Case:
    def __init__(self, index: int, rng: np.random.Generator, root: Path, modes: list[str]):
        self.index = index
        self.spec = rand_spec(rng)
        self.dir = root / f"case{index:03d}"
        self.model_dir = self.dir / "model"
        self.rng = rng
        self.modes = modes

    def build(self) -> None:
        spec, rng = self.spec, self.rng
        if self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "images").mkdir(parents=True)
        template = mf.TEMPLATE_PATH.read_text(encoding="utf-8")

        # score items / generate prompts first (their text also goes into the BPE corpus,
        # like a real tokenizer that has seen the domain)
        n_items = int(rng.integers(2, 6))
        self.score_items = []
        img_count = 0
        for _ in range(n_items):
            n_img = int(rng.choice([0, 1, 1, 1, 2, 3]))
            names = []
            for _ in range(n_img):
                h, w = rand_image_size(rng, spec["min_pixels"], spec["max_pixels"])
                mode = str(rng.choice(self.modes))
                name = f"img{img_count:02d}_{mode.lower()}_{h}x{w}.png"
                img_count += 1
                mf.save_png(mf.make_image(rng, h, w, mode), self.dir / "images" / name)
                names.append(name)
            self.score_items.append({"images": [f"images/{n}" for n in names], "prompt": rand_text(rng, 3, 10), "completion": rand_completion(rng)})
        self.gen_items = []
        for _ in range(int(rng.integers(1, 3))):
            src = self.score_items[int(rng.integers(0, len(self.score_items)))]
            self.gen_items.append({"images": list(src["images"]), "prompt": rand_text(rng, 3, 8), "max_new_tokens": int(rng.integers(3, 13))})

        texts = [x["prompt"] for x in self.score_items + self.gen_items] + [x["completion"] for x in self.score_items]
        tok = mf.hf_tokenizer(mf.build_tokenizer(spec["bpe_vocab"], texts), template)
        ids = mf.special_ids(tok)
        self.ids = ids
        model = mf.build_model(spec, ids, spec["seed"])
        if spec["layout"] == "v5":
            processor = mf.make_processor(tok, spec["min_pixels"], spec["max_pixels"], template)
            model.save_pretrained(self.model_dir)
            processor.save_pretrained(self.model_dir)
        else:
            dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["v4_dtype"]]
            if dtype == torch.bfloat16:
                mf.round_params_to_bf16(model)  # so that bf16 file -> f32 compute is exact
            mf.save_v4_layout(
                model, tok, spec, ids, self.model_dir, spec["min_pixels"], spec["max_pixels"], template, dtype=dtype, n_shards=spec["v4_shards"]
            )
        # reference = what transformers makes of the saved directory
        ref = mf.Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model_dir, dtype=torch.float32, attn_implementation="eager").eval()
        sd_a, sd_b = model.state_dict(), ref.state_dict()
        for k in sd_a:
            if not torch.equal(sd_a[k], sd_b[k]):
                raise AssertionError(f"reloaded weight differs: {k}")
        proc = mf.AutoProcessor.from_pretrained(self.model_dir)
        if proc.chat_template is None:
            proc.chat_template = proc.tokenizer.chat_template
        self.model, self.processor = ref, proc

    @torch.no_grad()
    def reference(self) -> None:
        self.ref_score = []
        for it in self.score_items:
            pil = [mf.open_image(self.dir / p) for p in it["images"]]
            enc = mf.encode(self.processor, pil, it["prompt"], it["completion"])
            logits = mf.forward_item(self.model, enc).float()
            lp = mf.completion_logprobs(logits, enc["input_ids"], enc["prompt_len"])
            self.ref_score.append({"completion_token_ids": enc["completion_ids"].tolist(), "token_logprobs": [float(x) for x in lp]})
        self.ref_gen = []
        for g in self.gen_items:
            pil = [mf.open_image(self.dir / p) for p in g["images"]]
            r = mf.greedy_generate(self.model, self.processor, pil, g["prompt"], None, g["max_new_tokens"])
            self.ref_gen.append(r)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.ids["<|im_end|>"]}

    def write_inputs(self) -> Path:
        p = self.dir / "score_in.jsonl"
        mf.dump_jsonl(p, self.score_items)
        return p


def run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    ids = list(ids)
    while ids and ids[-1] in eos:
        ids.pop()
    return ids


def check_score(case: Case, medrl: str, extra: list[str], atol: float, timeout: int) -> list[str]:
    errors = []
    inp = case.write_inputs()
    out = case.dir / "score_out.jsonl"
    if out.exists():
        out.unlink()
    cmd = [medrl, "score", "--model", str(case.model_dir), "--input", str(inp), "--output", str(out)] + extra
    cp = run(cmd, timeout)
    if cp.returncode != 0:
        return [f"score: exit {cp.returncode}: {shlex.join(cmd)}\n{cp.stderr[-2000:]}"]
    try:
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    except Exception as e:  # noqa: BLE001
        return [f"score: cannot read {out}: {e}"]
    if len(rows) != len(case.score_items):
        return [f"score: {len(rows)} output lines for {len(case.score_items)} inputs"]
    worst = 0.0
    for i, (row, it, ref) in enumerate(zip(rows, case.score_items, case.ref_score)):
        for k, v in it.items():
            if row.get(k) != v:
                errors.append(f"score item {i}: field {k!r} not copied from the input")
        got_ids = row.get("completion_token_ids")
        if got_ids != ref["completion_token_ids"]:
            errors.append(f"score item {i}: completion_token_ids {got_ids} != reference {ref['completion_token_ids']}")
            continue
        got_lp = row.get("token_logprobs")
        if not isinstance(got_lp, list) or len(got_lp) != len(ref["token_logprobs"]):
            errors.append(f"score item {i}: token_logprobs has wrong length")
            continue
        diffs = [abs(float(a) - b) if a is not None and math.isfinite(float(a)) else math.inf for a, b in zip(got_lp, ref["token_logprobs"])]
        d = max(diffs) if diffs else 0.0
        worst = max(worst, d)
        if d > atol:
            j = int(np.argmax(diffs))
            errors.append(f"score item {i}: |logprob diff| {d:.3g} > {atol:g} at completion token {j} (got {got_lp[j]}, ref {ref['token_logprobs'][j]})")
    case.score_worst = worst
    return errors


def parse_json_lines(text: str) -> list[dict]:
    objs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                o = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(o, dict) and "token_ids" in o:
                objs.append(o)
    return objs


def check_generate(case: Case, medrl: str, extra: list[str], timeout: int, tie_margin: float, strict_lp: bool) -> tuple[list[str], list[str]]:
    errors, warnings_ = [], []
    for gi, (g, ref) in enumerate(zip(case.gen_items, case.ref_gen)):
        cmd = [medrl, "generate", "--model", str(case.model_dir)]
        for p in g["images"]:
            cmd += ["--image", str(case.dir / p)]
        cmd += ["--prompt", g["prompt"], "--greedy", "--max-new-tokens", str(g["max_new_tokens"]), "--json"] + extra
        cp = run(cmd, timeout)
        if cp.returncode != 0:
            errors.append(f"generate {gi}: exit {cp.returncode}: {shlex.join(cmd)}\n{cp.stderr[-2000:]}")
            continue
        objs = parse_json_lines(cp.stdout)
        if len(objs) != 1:
            errors.append(f"generate {gi}: expected 1 JSON object with token_ids on stdout, got {len(objs)}")
            continue
        got = strip_eos([int(x) for x in objs[0]["token_ids"]], case.eos_ids)
        want = strip_eos(ref["token_ids"], case.eos_ids)
        n_cmp = len(ref["token_ids"])
        for step, m in enumerate(ref["margins"]):
            if m < tie_margin:
                n_cmp = step
                warnings_.append(f"generate {gi}: reference near-tie (margin {m:.2g}) at step {step}; compared {step} tokens")
                break
        if got[:n_cmp] != want[:n_cmp] or (n_cmp == len(ref["token_ids"]) and got != want):
            errors.append(f"generate {gi}: token_ids {got} != reference {want} (prompt {g['prompt']!r}, images {g['images']})")
            continue
        lps = objs[0].get("logprobs")
        if isinstance(lps, list) and lps:
            k = min(len(lps), len(ref["logprobs"]), n_cmp)
            d = max((abs(float(a) - b) for a, b in zip(lps[:k], ref["logprobs"][:k])), default=0.0)
            if d > 1e-3:
                msg = f"generate {gi}: logprobs differ by up to {d:.3g} from log_softmax of the raw logits"
                (errors if strict_lp else warnings_).append(msg)
    return errors, warnings_


def resolve_medrl(ap: argparse.ArgumentParser, args) -> str | None:
    """The absolute path of `--medrl` ("" with `--dry-run`); None (after saying why) when it is not an executable."""
    if args.dry_run:
        return ""
    if not args.medrl:
        ap.error("--medrl is required (or use --dry-run)")
    medrl = shutil.which(args.medrl) or args.medrl
    if not (os.path.isfile(medrl) and os.access(medrl, os.X_OK)):
        print(f"error: medrl binary not found or not executable: {args.medrl}", file=sys.stderr)
        return None
    return str(Path(medrl).resolve())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--medrl", help="path to the medrl binary")
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--tie-margin", type=float, default=1e-4)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per medrl call")
    ap.add_argument("--medrl-args", default="", help="extra arguments appended to every medrl call")
    ap.add_argument("--modes", default="RGB,RGB,L,P", help="comma-separated PIL modes to draw images from (RGBA differs on purpose: transformers 5.17 drops alpha, medrl composites on white as qwen-vl-utils does)")
    ap.add_argument("--workdir", type=Path, help="where to build the cases (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the case directories")
    ap.add_argument("--strict-logprobs", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="build cases and references only; do not run medrl")
    args = ap.parse_args(argv)

    medrl = resolve_medrl(ap, args)
    if medrl is None:
        return 2
    extra = shlex.split(args.medrl_args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    root = args.workdir or Path(tempfile.mkdtemp(prefix="medrl-parity-"))
    root.mkdir(parents=True, exist_ok=True)
    passed = failed = 0
    for k in range(args.cases):
        rng = np.random.default_rng([args.seed, k])
        case = Case(k, rng, root, modes)
        head = f"case {k} (seed {args.seed}) {describe(case.spec)}"
        try:
            case.build()
            case.reference()
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAIL {head}\n  could not build the reference:\n{traceback.format_exc()}", flush=True)
            continue
        n_img = sum(len(it["images"]) for it in case.score_items)
        info = f"{len(case.score_items)} score items / {n_img} images, {len(case.gen_items)} generate"
        if args.dry_run:
            passed += 1
            gens = "; ".join(f"{r['token_ids']}{' (eos)' if r['stopped_at_eos'] else ''} margin {min(r['margins']):.2g}" for r in case.ref_gen)
            print(f"BUILT {head}\n  {info}; reference greedy: {gens}", flush=True)
            continue
        try:
            errs = check_score(case, medrl, extra, args.atol, args.timeout)
            gerrs, warns = check_generate(case, medrl, extra, args.timeout, args.tie_margin, args.strict_logprobs)
            errs += gerrs
        except subprocess.TimeoutExpired as e:
            errs, warns = [f"timeout: {e}"], []
        if errs:
            failed += 1
            print(f"FAIL {head}\n  {info}; model dir {case.model_dir}", flush=True)
            for e in errs:
                print("  - " + e.replace("\n", "\n    "), flush=True)
        else:
            passed += 1
            print(f"PASS {head}\n  {info}; max |logprob diff| {getattr(case, 'score_worst', 0.0):.2g}", flush=True)
        for w in warns:
            print("  warning: " + w, flush=True)
    if not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    elif args.keep or args.workdir:
        print(f"cases kept in {root}")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
