#!/usr/bin/env python3
"""Held-out check of `medrl learner step` against the PyTorch reference.

For each case this builds a FRESH random tiny Qwen2.5-VL (random sizes, transformers 4.x or
5.x layout, tied or untied, bf16 or f32 files, 1-3 shards; a freshly trained byte-level BPE
tokenizer; see tools/parity/check_cli.py), a random recorded batch that the project has never
seen (1-3 groups of 2-5 completions with random images, tags, case, whitespace, trailing dots,
several or unclosed <answer> tags, literal <|im_end|> endings, bare answers; sometimes
sampling_logprobs so that some ratios are clipped), a random algorithm (grpo, grpo_care, sft)
and RUN.yaml, computes the reference step with tools/parity/make_learner_fixtures.py
(`reference_step`: transformers 5.17, f32, eager attention, torch optimizers), then runs

    medrl learner step --model DIR --batch GROUPS.jsonl --config RUN.yaml --output OUT

and compares: rewards / advantages / bonus within 1e-9 (shapes exactly), tokens exactly,
loss within max(--loss-atol, --rtol * |loss|) (the on-policy GRPO loss is analytically 0, so a
relative tolerance alone is meaningless there), grad_norm within --rtol relative, and every
tensor of OUT/model.safetensors (or its shards + index) with the reference within --atol
(f32, legacy names visual.* / model.* / lm_head.*; for a tied model lm_head.weight may be
absent or must equal model.embed_tokens.weight). It also checks that OUT has config.json and
tokenizer files and that transformers loads OUT (skip with --no-load-check).

Usage (from the repository root, in the venv of tools/parity/requirements.txt + pyyaml):

    python tools/parity/check_learner_step.py --medrl target/release/medrl [--cases N] [--seed S]

Other options: --dry-run (build cases and references only; no medrl), --algorithms
grpo,grpo_care,sft, --optimizers sgd[,adamw] (default sgd), --offpolicy-prob P, --keep,
--workdir DIR, --medrl-args "..." (appended to every medrl call, e.g. "--device cpu"),
--timeout SECONDS, --precision-check (also redo the reference in f64 and print the gap).

Prints one line (plus details) per case and a final line "N passed, M failed"; exit code 0
when everything passed, 1 when something failed, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import check_cli as cc  # noqa: E402
import make_fixtures as mf  # noqa: E402
import make_learner_fixtures as lf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ANSWERS = ["A", "B", "C", "D", "yes", "no", "normal", "2", "left lung", "mass"]
THINK_WORDS = (
    "the image shows a small round mass in left right lung liver kidney brain heart bone scan "
    "lesion normal abnormal fracture nodule so it is likely not clear maybe wait yes"
).split()
IM_END = lf.IM_END
OFFSETS = [0.5, -0.5, 0.3, -0.3, 0.1, -0.1, 0.02, 0.0]


def think_text(rng) -> str:
    return " ".join(str(rng.choice(THINK_WORDS)) for _ in range(int(rng.integers(1, 7))))


def variant(rng, ans: str) -> str:
    """The gold answer written differently but still equal after clean_text."""
    k = int(rng.integers(0, 6))
    if k == 1:
        return ans.upper() if ans.lower() == ans else ans.lower()
    if k == 2:
        return f" {ans} "
    if k == 3:
        return ans + "."
    if k == 4:
        return f"\n{ans}\n"
    return ans


def wrong(rng, gold: str) -> str:
    others = [a for a in ANSWERS if a.lower() != gold.lower()]
    return str(rng.choice(others))


def rand_completion(rng, gold: str) -> str:
    right = rng.random() < 0.5
    ans = variant(rng, gold) if right else wrong(rng, gold)
    sep = str(rng.choice(["", " ", "\n", "\n\n"]))
    kind = int(rng.choice([0, 0, 0, 0, 1, 2, 3, 4, 5, 6]))
    if kind == 0:  # well formed
        s = f"<think> {think_text(rng)} </think>{sep}<answer>{ans}</answer>"
    elif kind == 1:  # bare answer
        s = ans.strip() or ans
    elif kind == 2:  # trailing text after the answer (format fails)
        s = f"<think> {think_text(rng)} </think><answer>{ans}</answer> {think_text(rng)}"
    elif kind == 3:  # several answer tags: the last one counts
        s = f"<think> {think_text(rng)} </think><answer>{wrong(rng, gold)}</answer>{sep}<answer>{ans}</answer>"
    elif kind == 4:  # unclosed answer
        s = f"<think> {think_text(rng)} </think><answer>{ans}"
    elif kind == 5:  # a trailing opening tag (the released scan skips the last two tokens)
        s = f"<think> {think_text(rng)} </think><answer>{ans}</answer><answer>"
    else:  # no think block
        s = f"<answer>{ans}</answer>"
    if rng.random() < 0.5:
        s += IM_END
    return s


def rule_rewards(group: dict) -> list[float]:
    """format + accuracy of each completion (text with <|im_end|> removed = the decoded text
    for these ASCII completions)."""
    out = []
    for c in group["completions"]:
        t = c.replace(IM_END, "")
        out.append(lf.format_reward(t) + lf.accuracy_reward(t, group["answer"]))
    return out


def rand_prompt(rng) -> str:
    p = cc.rand_text(rng, 3, 9)
    if rng.random() < 0.4:
        p += lf.R1V_HINT
    return p


class Case:
    def __init__(self, index: int, seed: int, root: Path, algorithms: list[str], optimizers: list[str], offpolicy_prob: float):
        self.index = index
        self.rng = np.random.default_rng([seed, index])
        self.spec = cc.rand_spec(self.rng)
        self.dir = root / f"case{index:03d}"
        self.model_dir = self.dir / "model"
        self.algorithm = str(self.rng.choice(algorithms))
        self.optimizer = str(self.rng.choice(optimizers))
        self.offpolicy = self.algorithm != "sft" and self.rng.random() < offpolicy_prob
        self.max_grad_norm = float(self.rng.choice([1.0, 5.0, 100.0]))

    def describe(self) -> str:
        return f"{self.algorithm}{' off-policy' if self.offpolicy else ''} {self.optimizer} max_grad_norm={self.max_grad_norm:g}; model {cc.describe(self.spec)}"

    def draw_groups(self, rng) -> list[dict]:
        spec = self.spec
        groups = []
        n_groups = int(rng.integers(1, 4))
        img_count = 0
        for gi in range(n_groups):
            n_img = int(rng.choice([0, 1, 1, 2])) if gi > 0 else int(rng.choice([1, 1, 2]))
            names = []
            for _ in range(n_img):
                h, w = cc.rand_image_size(rng, spec["min_pixels"], spec["max_pixels"])
                name = f"img{img_count:02d}_{h}x{w}.png"
                img_count += 1
                mf.save_png(mf.make_image(rng, h, w, "RGB"), self.dir / "images" / name)
                names.append(f"images/{name}")
            gold = str(rng.choice(ANSWERS))
            if rng.random() < 0.3:
                gold = f"<answer>{gold}</answer>"
            g_plain = gold.replace("<answer>", "").replace("</answer>", "")
            n = int(rng.integers(2, 6))
            comps = [rand_completion(rng, g_plain) for _ in range(n)]
            groups.append({"images": names, "prompt": rand_prompt(rng), "answer": gold, "completions": comps})
        return groups

    def build(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "images").mkdir(parents=True)
        rng = self.rng
        for _ in range(50):  # RL cases: at least one group whose rule rewards are not all equal
            self.groups = self.draw_groups(rng)
            if self.algorithm == "sft" or any(len(set(rule_rewards(g))) > 1 for g in self.groups):
                break
            shutil.rmtree(self.dir / "images")
            (self.dir / "images").mkdir()
        texts = [g["prompt"] for g in self.groups] + [c for g in self.groups for c in g["completions"]]
        template = mf.TEMPLATE_PATH.read_text(encoding="utf-8")
        spec = self.spec
        tok = mf.hf_tokenizer(mf.build_tokenizer(spec["bpe_vocab"], texts), template)
        ids = mf.special_ids(tok)
        model = mf.build_model(spec, ids, spec["seed"])
        if spec["layout"] == "v5":
            processor = mf.make_processor(tok, spec["min_pixels"], spec["max_pixels"], template)
            model.save_pretrained(self.model_dir)
            processor.save_pretrained(self.model_dir)
        else:
            dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["v4_dtype"]]
            if dtype == torch.bfloat16:
                mf.round_params_to_bf16(model)
            mf.save_v4_layout(model, tok, spec, ids, self.model_dir, spec["min_pixels"], spec["max_pixels"], template, dtype=dtype, n_shards=spec["v4_shards"])
        if self.offpolicy:
            self.add_sampling_logprobs(rng)
        mf.dump_jsonl(self.dir / "groups.jsonl", self.groups)
        opt = lf.SGD if self.optimizer == "sgd" else lf.ADAMW
        self.run_text = lf.run_yaml(self.algorithm, opt, self.max_grad_norm)
        (self.dir / "run.yaml").write_text(self.run_text, encoding="utf-8")

    def add_sampling_logprobs(self, rng) -> None:
        model, processor = lf.load_policy(self.model_dir)
        batch = lf.encode_batch(processor, self.groups, self.dir)
        for g, b in zip(self.groups, batch):
            enc = b["enc"]
            rows = []
            for cids in b["completions"]:
                item = {"input_ids": torch.cat([enc["prompt_ids"], cids]), "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(cids)])}
                if "pixel_values" in enc:
                    item.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
                with torch.no_grad():
                    lp = mf.completion_logprobs(mf.forward_item(model, item), item["input_ids"], enc["prompt_len"])
                d = torch.tensor([float(rng.choice(OFFSETS)) for _ in range(len(lp))], dtype=torch.float32)
                rows.append([float(x) for x in (lp + d).to(torch.float32)])
            g["sampling_logprobs"] = rows

    def reference(self, precision_check: bool) -> None:
        self.ref = lf.reference_step(self.model_dir, self.dir / "groups.jsonl", self.run_text, torch.float32)
        self.prec = None
        if precision_check:
            r64 = lf.reference_step(self.model_dir, self.dir / "groups.jsonl", self.run_text, torch.float64)
            self.prec = lf.compare_precision(self.ref, r64)
        # decisions that an f32 re-implementation could flip
        self.ambiguous = []
        for row in self.ref["debug"]["completions"]:
            m = row.get("min_distance_to_confidence_threshold")
            if m is not None and m < 1e-5:
                self.ambiguous.append(f"group {row['group']}: a confidence is {m:.2g} from the CARE threshold")
        for ri in self.ref["debug"]["ratios"]:
            if ri["min_ratio_distance_to_clip_bound"] < 1e-4:
                self.ambiguous.append(f"group {ri['group']} completion {ri['index']}: a ratio is {ri['min_ratio_distance_to_clip_bound']:.2g} from a clip bound")


def read_weights(out: Path) -> dict[str, torch.Tensor]:
    idx = out / "model.safetensors.index.json"
    if (out / "model.safetensors").exists():
        return load_file(str(out / "model.safetensors"))
    if idx.exists():
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        w = {}
        for f in files:
            w.update(load_file(str(out / f)))
        return w
    raise FileNotFoundError(f"no model.safetensors (or index) in {out}")


def parse_json_line(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "loss" in obj:
                return obj
    raise ValueError("no JSON line with a 'loss' field on stdout")


def compare_nested(name: str, got, exp, atol: float, errors: list[str]) -> float:
    if not isinstance(got, list) or len(got) != len(exp):
        errors.append(f"{name}: shape differs: got {got!r}, expected {exp!r}")
        return float("inf")
    worst = 0.0
    for gi, (a, b) in enumerate(zip(got, exp)):
        if not isinstance(a, list) or len(a) != len(b):
            errors.append(f"{name}[{gi}]: length differs: got {a!r}, expected {b!r}")
            worst = float("inf")
            continue
        for ci, (x, y) in enumerate(zip(a, b)):
            d = abs(float(x) - float(y))
            worst = max(worst, d)
            if not d <= atol:
                errors.append(f"{name}[{gi}][{ci}] = {x!r}, expected {y!r}")
    return worst


def check_case(case: Case, medrl: str, extra: list[str], args) -> tuple[list[str], str]:
    out = case.dir / "out"
    if out.exists():
        shutil.rmtree(out)
    cmd = [medrl, "learner", "step", "--model", str(case.model_dir), "--batch", str(case.dir / "groups.jsonl"), "--config", str(case.dir / "run.yaml"), "--output", str(out)] + extra
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        return [f"medrl exited with {p.returncode}\n$ {shlex.join(cmd)}\nstderr: {p.stderr[-3000:]}"], ""
    errors: list[str] = []
    try:
        got = parse_json_line(p.stdout)
    except ValueError as e:
        return [f"{e}; stdout: {p.stdout[-2000:]}"], ""
    exp = case.ref["expected"]
    for k in ("loss", "grad_norm", "rewards", "advantages", "bonus", "tokens"):
        if k not in got:
            errors.append(f"missing field {k!r} in {got}")
    if errors:
        return errors, ""
    compare_nested("rewards", got["rewards"], exp["rewards"], 1e-9, errors)
    worst_adv = compare_nested("advantages", got["advantages"], exp["advantages"], 1e-9, errors)
    compare_nested("bonus", got["bonus"], exp["bonus"], 1e-9, errors)
    if got["tokens"] != exp["tokens"]:
        errors.append(f"tokens = {got['tokens']}, expected {exp['tokens']}")
    dl = abs(float(got["loss"]) - exp["loss"])
    if not dl <= max(args.loss_atol, args.rtol * abs(exp["loss"])):
        errors.append(f"loss = {got['loss']!r}, expected {exp['loss']!r} (diff {dl:.3g})")
    dg = abs(float(got["grad_norm"]) - exp["grad_norm"]) / max(abs(exp["grad_norm"]), 1e-30)
    if not dg <= args.rtol:
        errors.append(f"grad_norm = {got['grad_norm']!r}, expected {exp['grad_norm']!r} (rel diff {dg:.3g})")

    # weights
    worst_w, worst_name = 0.0, ""
    try:
        w = read_weights(out)
    except Exception as e:  # noqa: BLE001
        errors.append(f"cannot read the output weights: {e}")
        w = None
    if w is not None:
        ref = case.ref["new"]
        tied = "lm_head.weight" not in ref
        extra_keys = set(w) - set(ref) - ({"lm_head.weight"} if tied else set())
        missing = set(ref) - set(w)
        if extra_keys:
            errors.append(f"unexpected tensors in the output: {sorted(extra_keys)[:8]}")
        if missing:
            errors.append(f"tensors missing from the output: {sorted(missing)[:8]} ({len(missing)} in all)")
        dtypes = sorted({str(t.dtype) for t in w.values()})
        if dtypes != ["torch.float32"]:
            errors.append(f"output dtypes {dtypes}; the reference is f32 (full fine-tune in f32)")
        n_bad = 0
        for k in sorted(set(ref) & set(w)):
            a, b = w[k].to(torch.float32), ref[k]
            if a.shape != b.shape:
                errors.append(f"{k}: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
                continue
            d = float((a - b).abs().max())
            if d > worst_w:
                worst_w, worst_name = d, k
            if not d <= args.atol:
                n_bad += 1
                if n_bad <= 8:
                    upd = case.ref["debug"]["update_l2"][k]
                    got_upd = float((a.double() - case.ref["old"][k].double()).norm())
                    errors.append(f"{k}: max |diff| {d:.3g} > {args.atol:g} (update L2: got {got_upd:.4g}, expected {upd:.4g})")
        if n_bad > 8:
            errors.append(f"... {n_bad} tensors differ in all")
        if tied and "lm_head.weight" in w and "model.embed_tokens.weight" in w:
            if not torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"]):
                errors.append("tied model: lm_head.weight != model.embed_tokens.weight in the output")
    for f in ("config.json", "tokenizer.json"):
        if not (out / f).exists():
            errors.append(f"output has no {f}")
    if args.load_check and w is not None and not errors:
        try:
            m = mf.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
            for n, prm in m.named_parameters():
                ln = mf.v5_saved_name(n)
                d = float((prm.detach() - case.ref["new"][ln]).abs().max())
                if not d <= args.atol:
                    errors.append(f"transformers loads OUT but {ln} differs by {d:.3g}")
                    break
            mf.AutoProcessor.from_pretrained(out)
        except Exception as e:  # noqa: BLE001
            errors.append(f"transformers cannot load the output directory: {type(e).__name__}: {e}")
    summary = f"max |weight diff| {worst_w:.2g} ({worst_name}), loss diff {dl:.2g}, grad_norm rel diff {dg:.2g}, max |adv diff| {worst_adv:.2g}"
    return errors, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--medrl", help="path to the medrl binary")
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--atol", type=float, default=1e-5, help="weights, absolute")
    ap.add_argument("--rtol", type=float, default=1e-5, help="loss and grad_norm, relative")
    ap.add_argument("--loss-atol", type=float, default=1e-6, help="loss, absolute floor (on-policy GRPO loss is ~0)")
    ap.add_argument("--algorithms", default="grpo,grpo_care,sft")
    ap.add_argument("--optimizers", default="sgd")
    ap.add_argument("--offpolicy-prob", type=float, default=0.3)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per medrl call")
    ap.add_argument("--medrl-args", default="", help="extra arguments appended to every medrl call")
    ap.add_argument("--workdir", type=Path, help="where to build the cases (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the case directories")
    ap.add_argument("--no-load-check", dest="load_check", action="store_false", help="do not load OUT with transformers")
    ap.add_argument("--precision-check", action="store_true", help="also compute the reference in f64 and print the gap")
    ap.add_argument("--dry-run", action="store_true", help="build cases and references only; do not run medrl")
    args = ap.parse_args(argv)

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not set(algorithms) <= {"grpo", "grpo_care", "sft"} or not set(optimizers) <= {"sgd", "adamw"} or not algorithms or not optimizers:
        ap.error("--algorithms takes grpo,grpo_care,sft; --optimizers takes sgd,adamw")
    medrl = cc.resolve_medrl(ap, args)
    if medrl is None:
        return 2
    extra = shlex.split(args.medrl_args)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    root = args.workdir or Path(tempfile.mkdtemp(prefix="medrl-learner-"))
    root.mkdir(parents=True, exist_ok=True)
    passed = failed = 0
    for k in range(args.cases):
        case = Case(k, args.seed, root, algorithms, optimizers, args.offpolicy_prob)
        head = f"case {k} (seed {args.seed}) {case.describe()}"
        try:
            case.build()
            case.reference(args.precision_check)
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAIL {head}\n  could not build the reference:\n{traceback.format_exc()}", flush=True)
            continue
        e = case.ref["expected"]
        n_img = sum(len(g["images"]) for g in case.groups)
        info = (
            f"{len(case.groups)} groups / {sum(len(g['completions']) for g in case.groups)} completions / {n_img} images, "
            f"tokens {e['tokens']}, loss {e['loss']:.6g}, grad_norm {e['grad_norm']:.6g}{' (clipped)' if case.ref['debug']['clipped'] else ''}"
        )
        if e["rewards"]:
            info += f", rewards {e['rewards']}"
        if any(any(b) for b in e["bonus"]):
            info += f", bonus {e['bonus']}"
        if case.ref["debug"]["ratios"]:
            info += f", clipped tokens {sum(r['clipped_tokens'] for r in case.ref['debug']['ratios'])}"
        if case.prec is not None:
            info += f"\n  f32 vs f64 reference: max |weight diff| {case.prec['max_abs_weight_diff']:.2g}, loss diff {case.prec['loss_abs_diff']:.2g}, grad_norm rel diff {case.prec['grad_norm_rel_diff']:.2g}, rewards equal {case.prec['rewards_equal']}"
        for a in case.ambiguous:
            info += f"\n  warning: {a} (an f32 re-implementation may legitimately differ here)"
        if args.dry_run:
            passed += 1
            print(f"BUILT {head}\n  {info}", flush=True)
            continue
        try:
            errs, summary = check_case(case, medrl, extra, args)
        except subprocess.TimeoutExpired as ex:
            errs, summary = [f"timeout: {ex}"], ""
        if errs:
            failed += 1
            print(f"FAIL {head}\n  {info}\n  case dir {case.dir}", flush=True)
            for er in errs:
                print("  - " + er.replace("\n", "\n    "), flush=True)
        else:
            passed += 1
            print(f"PASS {head}\n  {info}\n  {summary}", flush=True)
    if not args.keep and args.workdir is None and failed == 0:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"cases kept in {root}")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
