"""Researcher workflows, attribution part: one function per comparison (run by benchmarks/research.py).

Run: ``python benchmarks/research.py [--quick] [--threads N] [--only attribution] [--only qk_fix]``
(this file also runs alone, with ``--only NAME ...``). One random GPT-2
(4 layers, width 512, 8 heads; no downloads), CPU, a batch of 8 base/source prompt pairs of 16 tokens,
metric = mean logit difference of two tokens at the last position. Each comparison checks that the
outputs agree before anything is timed. The last output line is one JSON object with the ratios.
Method and figures: docs/benchmarks.md ("Researcher workflows").

- ``attribution``: `iv.attribution_patching` at every layer's heads, MLP output and residual output vs
  the same computed with hand-written torch hooks + `torch.autograd.grad` (goal: <= 1.2x).
- ``qk_fix``: accuracy, not speed: on tiny GPT-2s whose layer-1 attention is saturated (queries scaled
  up), how many of the (example, position, head) keys/queries that matter under real activation
  patching plain attribution misses, and how many `qk_fix=True` (AtP*) still misses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import transformers as tf
from einops import rearrange

import interventions as iv
from benchmarks.common import clock_name, median_times, random_gpt2, use_process_time

tf.logging.set_verbosity_error()
TOL = 1e-5


@dataclass(frozen=True)
class Setup:
    """Model size and workload."""

    layers: int = 4
    width: int = 512
    heads: int = 8
    vocab: int = 50257
    batch: int = 8
    seq: int = 16
    repeats: int = 9


FULL = Setup()
QUICK = Setup(layers=2, width=128, heads=4, vocab=2000, batch=4, seq=8, repeats=5)
def build_model(s: Setup) -> tf.GPT2LMHeadModel:
    return random_gpt2(s.layers, s.width, s.heads, s.vocab, positions=256)


def prompts(s: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen),
        torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen),
    )


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 11] - logits[:, -1, 13]).mean()


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- attribution patching -------------------------------------------------------------------------
class _Stop(Exception):
    pass


def handwritten_attribution(model, base, source, metric) -> dict[str, torch.Tensor]:
    """As lean as we can write it by hand: raw torch hooks on GPT-2's modules, autograd on captured values.

    Source: one no-grad forward that stops (an exception from the last hook) after the last block, so
    no LM head. Base: one forward capturing each value (made a leaf where nothing upstream needs grad),
    one `torch.autograd.grad`. Heads are c_proj's input viewed per head.
    """
    heads, blocks = model.config.n_head, model.transformer.h
    points = []
    for i, block in enumerate(blocks):
        points += [
            (f"layers.{i}.attention_heads", block.attn.c_proj, "pre"),
            (f"layers.{i}.mlp_output", block.mlp, "out"),
            (f"layers.{i}.output", block, "out"),
        ]
    last = points[-1][0]

    def install(fn):
        handles = []
        for name, mod, kind in points:
            if kind == "pre":

                def pre(m, args, name=name):
                    v = fn(name, rearrange(args[0], "b s (h d) -> b s h d", h=heads))
                    return (rearrange(v, "b s h d -> b s (h d)"),)

                handles.append(mod.register_forward_pre_hook(pre))
            else:

                def post(m, args, out, name=name):
                    first = out[0] if isinstance(out, tuple) else out
                    v = fn(name, first)
                    return (v, *out[1:]) if isinstance(out, tuple) else v

                handles.append(mod.register_forward_hook(post))
        return handles

    src: dict[str, torch.Tensor] = {}

    def read(name, v):
        src[name] = v
        if name == last:
            raise _Stop
        return v

    handles = install(read)
    try:
        with torch.no_grad():
            model(source)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    got: dict[str, torch.Tensor] = {}

    def keep(name, v):
        if not v.requires_grad:
            v = v.detach().requires_grad_()
        got[name] = v
        return v

    handles = install(keep)
    try:
        value = metric(model(base).logits)
    finally:
        for h in handles:
            h.remove()
    names = list(got)
    grads = torch.autograd.grad(value, [got[n] for n in names])
    return {n: ((src[n] - got[n].detach()) * g).sum(-1) for n, g in zip(names, grads)}


def attribution(s: Setup, model) -> dict:
    """attribution_patching at every layer's attention_heads, mlp_output and output vs hand-written hooks."""
    base, source = prompts(s)
    sites = [
        f"layers.{i}.{part}" for i in range(s.layers) for part in ("attention_heads", "mlp_output", "output")
    ]

    def ours():
        return iv.attribution_patching(model, base, source, sites, logit_diff)

    def handwritten():
        return handwritten_attribution(model, base, source, logit_diff)

    diff = max_diff(handwritten(), {k.name: v for k, v in ours().items()})
    if diff > TOL:
        raise SystemExit(f"attribution: ours and the hand-written version differ by {diff:.2e} (> {TOL})")
    times = median_times({"ours": ours, "handwritten": handwritten}, s.repeats)
    ratio = times["ours"] / times["handwritten"]
    print(
        f"attribution patching, {len(sites)} sites, batch {s.batch} x {s.seq} tokens (max|diff| {diff:.1e})"
    )
    print(f"  ours        {times['ours'] * 1e3:8.1f} ms")
    print(f"  handwritten {times['handwritten'] * 1e3:8.1f} ms")
    print(f"  ratio ours / handwritten = {ratio:.3f}  (goal <= 1.2)")
    return {
        "attribution_ours_s": times["ours"],
        "attribution_handwritten_s": times["handwritten"],
        "attribution_ratio": ratio,
        "attribution_max_diff": diff,
    }


# -- AtP*'s QK fix under saturated attention ------------------------------------------------------------
def saturated_model(scale: float, seed: int) -> tf.GPT2LMHeadModel:
    """A tiny float64 GPT-2 (2 layers, width 64, 4 heads), weights N(0, 0.3), layer-1 queries x `scale`."""
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=50,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = tf.GPT2LMHeadModel(config).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(
                0.3 * noise if p.dim() >= 2 else (1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            )
        attn = model.transformer.h[1].attn.c_attn
        attn.weight[:, :64] *= scale
        attn.bias[:64] *= scale
    return model


def qk_fix(s: Setup, model) -> dict:
    """False negatives of plain attribution vs qk_fix=True, both against real patching per node."""
    rows, out = [], {}
    per_example = lambda logits: logits[:, -1, 3] - logits[:, -1, 5]
    metric = lambda logits: per_example(logits).mean()
    for scale in (1.0, 10.0, 30.0):
        for seed in range(3):
            m = saturated_model(scale, seed)
            gen = torch.Generator().manual_seed(100 + seed)
            base, source = (torch.randint(0, 50, (8, 8), generator=gen) for _ in range(2))
            top = float(
                iv.get_value(m, base, "layers.1.attention_pattern")["layers.1.attention_pattern"]
                .amax(-1)
                .mean()
            )
            clean = per_example(m(base).logits)
            for kind in ("keys", "queries"):
                name = f"layers.1.{kind}"
                plain = iv.attribution_patching(m, base, source, name, metric)[name]
                fixed = iv.attribution_patching(m, base, source, name, metric, qk_fix=True)[name]
                real = torch.zeros_like(plain)
                with torch.no_grad():
                    for t in range(base.shape[1]):
                        for h in range(real.shape[2]):
                            patched = iv.interchange(m, base, source, iv.Site(name, positions=[t], heads=[h]))
                            real[:, t, h] = (per_example(patched.logits) - clean) / base.shape[0]
                threshold = 0.1 * real.abs().max()
                matters = real.abs() > threshold
                row = dict(
                    scale=scale,
                    seed=seed,
                    kind=kind,
                    top_prob=top,
                    matter=int(matters.sum()),
                    missed_plain=int((matters & (plain.abs() < threshold)).sum()),
                    missed_fixed=int((matters & (fixed.abs() < threshold)).sum()),
                    l1_plain=float((plain - real).abs().sum() / real.abs().sum()),
                    l1_fixed=float((fixed - real).abs().sum() / real.abs().sum()),
                )
                rows.append(row)
    print(
        "qk_fix: (example, position, head) nodes of layer 1 with |real effect| > 10% of the largest; "
        "missed = |estimate| below that threshold"
    )
    print("  scale  mean max attn  kind     matter  missed plain  missed qk_fix  rel. L1 err plain  qk_fix")
    for scale in (1.0, 10.0, 30.0):
        for kind in ("keys", "queries"):
            rs = [r for r in rows if r["scale"] == scale and r["kind"] == kind]
            agg = {k: sum(r[k] for r in rs) for k in ("matter", "missed_plain", "missed_fixed")}
            top = statistics.mean(r["top_prob"] for r in rs)
            l1p, l1f = (statistics.mean(r[k] for r in rs) for k in ("l1_plain", "l1_fixed"))
            print(
                f"  {scale:5.0f}  {top:13.3f}  {kind:7s}  {agg['matter']:6d}  {agg['missed_plain']:12d}  "
                f"{agg['missed_fixed']:13d}  {l1p:17.3f}  {l1f:6.3f}"
            )
            out[f"qk_fix_scale{scale:g}_{kind}"] = {**agg, "l1_plain": l1p, "l1_fixed": l1f, "top_prob": top}
    return out


COMPARISONS = {"attribution": attribution, "qk_fix": qk_fix}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and batch (seconds)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1: timed in process CPU time)"
    )
    parser.add_argument("--only", nargs="*", choices=sorted(COMPARISONS), help="run only these comparisons")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count())
    if args.threads == 1:
        use_process_time()
    s = QUICK if args.quick else FULL
    model = build_model(s)
    print(
        f"GPT-2 {s.layers} layers, width {s.width}, {s.heads} heads, vocab {s.vocab}; "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), clock: {clock_name()}"
    )
    results = {"setup": s.__dict__, "threads": torch.get_num_threads()}
    for name in args.only or COMPARISONS:
        results.update(COMPARISONS[name](s, model))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
