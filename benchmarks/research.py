"""Researcher workflows, side by side: this library vs TransformerLens, nnsight and hand-written hooks (one process).

Parts (``--only NAME``, repeatable; default all): ``head_sweep``, ``sweep_memory`` (below), and
``attribution``, ``qk_fix`` (benchmarks/research_attribution.py: `attribution_patching` vs hand-written
hooks + autograd, and the AtP* QK fix's false negatives on saturated attention).

Head sweep: activation patching of every attention head at every position in every layer, over a
batch of prompt pairs, with a logit-difference metric — `patching_sweep(..., site="attention_heads",
metric=...)` vs TransformerLens' `patching.get_act_patch_attn_head_out_by_pos` (on a
`TransformerBridge` around the same weights) vs a loop of nnsight traces. Every peer's output is
checked equal to ours before anything is timed. See docs/benchmarks.md.

    python benchmarks/research.py --threads 1        # 4 layers, width 512, 8 heads, batch 8 x 16 tokens
    python benchmarks/research.py --quick            # a tiny model: a smoke test of the whole script
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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

from benchmarks.common import random_gpt2, timed, use_process_time, version
from interventions import patching_sweep

tf.logging.set_verbosity_error()
TOL = 1e-4  # float32 logit differences of O(1); the peers' attention paths round differently
# -- head sweep -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSweepSetup:
    """Model size and workload of the head-patching sweep."""

    layers: int
    width: int
    heads: int
    vocab: int
    batch: int
    seq: int


HEAD_SWEEP_FULL = HeadSweepSetup(layers=4, width=512, heads=8, vocab=50257, batch=8, seq=16)
HEAD_SWEEP_QUICK = HeadSweepSetup(layers=2, width=64, heads=4, vocab=1000, batch=2, seq=6)


def head_sweep_model(s: HeadSweepSetup) -> tf.GPT2LMHeadModel:
    """A random GPT-2 from a config (no downloads, no dropout, no key/value cache, eval mode)."""
    return random_gpt2(s.layers, s.width, s.heads, s.vocab, positions=256, use_cache=False, bos_token_id=0,
                       eos_token_id=0)


def head_sweep_inputs(s: HeadSweepSetup):
    """Clean and corrupted prompts [batch, seq] and each pair's correct / wrong answer token."""
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen)
    corrupted = torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen)
    correct = torch.randint(0, s.vocab, (s.batch,), generator=gen)
    wrong = torch.randint(0, s.vocab, (s.batch,), generator=gen)
    return clean, corrupted, correct, wrong


def head_sweep_flops(s: HeadSweepSetup) -> dict[str, float]:
    """FLOPs each method must do (multiply-add = 2; norms, embeddings and element-wise ops ignored)."""
    block = 24 * s.width ** 2 + 4 * s.seq * s.width  # one block on one token
    head = 2 * s.width * s.vocab  # the LM head on one position
    tokens = s.batch * s.seq
    full_run = tokens * s.layers * block + tokens * head
    patches = s.layers * s.seq * s.heads
    # ours: source (headless) + clean run (head at the readout) + per layer L the copies through blocks L..
    copies = s.seq * s.heads * tokens * sum(s.layers - layer for layer in range(s.layers))
    ours = tokens * s.layers * block * 2 + s.batch * head + copies * block + patches * s.batch * head
    return {"ours": ours, "transformer_lens": (patches + 1) * full_run, "nnsight": patches * full_run
            + tokens * s.layers * block}


def head_sweep(s: HeadSweepSetup, results: dict) -> None:
    """Time the head-patching sweep of ours against TransformerLens and nnsight; print a table."""
    model = head_sweep_model(s)
    clean, corrupted, correct, wrong = head_sweep_inputs(s)
    rows = torch.arange(s.batch)

    def logit_diff(logits):  # ours: logits at the readout [batch, vocab]
        return (logits[rows, correct] - logits[rows, wrong]).mean()

    def logit_diff_last(logits):  # the peers: all logits [batch, seq, vocab]
        return logit_diff(logits[:, -1])

    def ours():
        return patching_sweep(model, corrupted, clean, site="attention_heads", metric=logit_diff)

    runs, check = {"ours": ours}, {}
    try:
        from transformer_lens import patching as tl_patching
        from transformer_lens.model_bridge.sources import build_bridge_from_module
    except Exception as e:  # noqa: BLE001 - a peer that cannot load is reported, never silently dropped
        print(f"NOTE: transformer_lens could not be loaded ({type(e).__name__}: {e}); left out")
    else:
        tl_patching.tqdm = lambda it, **_: it  # silence its progress bar (output only)
        bridge = build_bridge_from_module(copy.deepcopy(model), "GPT2LMHeadModel", hf_config=model.config).eval()

        def transformer_lens(index_df=None):
            _, cache = bridge.run_with_cache(clean, names_filter=lambda name: name.endswith("attn.hook_z"))
            if index_df is None:
                return tl_patching.get_act_patch_attn_head_out_by_pos(bridge, corrupted, cache, logit_diff_last)
            return tl_patching.generic_activation_patch(bridge, corrupted, cache, logit_diff_last,
                                                        tl_patching.layer_pos_head_vector_patch_setter, "z",
                                                        index_df=index_df)

        runs["transformer_lens"] = transformer_lens
        check["transformer_lens"] = transformer_lens
    try:
        import nnsight
    except Exception as e:  # noqa: BLE001
        print(f"NOTE: nnsight could not be loaded ({type(e).__name__}: {e}); left out")
    else:
        traced = nnsight.NNsight(copy.deepcopy(model))  # it rewraps every forward: a copy
        blocks, dh = traced.transformer.h, s.width // s.heads

        def nnsight_loop(cells=None):
            with traced.trace(clean) as tracer:  # the heads' outputs = the input of each c_proj
                z = nnsight.save([blocks[layer].attn.c_proj.input for layer in range(s.layers)])
                tracer.stop()
            cells = cells or [(la, p, h) for la in range(s.layers) for p in range(s.seq) for h in range(s.heads)]
            out = torch.zeros(s.layers, s.seq, s.heads)
            for layer, p, h in cells:
                cols = slice(h * dh, (h + 1) * dh)
                with traced.trace(corrupted):
                    blocks[layer].attn.c_proj.input[:, p, cols] = z[layer][:, p, cols]
                    value = logit_diff_last(traced.output.logits).save()
                out[layer, p, h] = value
            return out

        runs["nnsight"] = nnsight_loop
        check["nnsight"] = nnsight_loop

    # Agreement before timing: ours in full, each peer on a subset of cells (first / last layer and
    # position, all heads); then the timed full runs are compared again.
    import pandas as pd

    cells = [(la, p, h) for la in {0, s.layers - 1} for p in {0, s.seq - 1} for h in range(s.heads)]
    with torch.no_grad():
        reference = ours()
        for name, fn in check.items():
            if name == "transformer_lens":
                got = fn(pd.DataFrame(cells, columns=["layer", "pos", "head"]))
                expected = torch.stack([reference[c] for c in cells])
            else:
                got = fn(cells)[tuple(torch.tensor(cells).T)]
                expected = torch.stack([reference[c] for c in cells])
            diff = (got.float() - expected.float()).abs().max().item()
            assert diff <= TOL, f"head sweep: {name} disagrees with ours on {len(cells)} cells: {diff:.3g} > {TOL}"
        times, diffs = {}, {}
        for name, fn in runs.items():
            out, times[name] = timed(fn)
            diffs[name] = (out.float() - reference.float()).abs().max().item()
            assert diffs[name] <= TOL, f"head sweep: {name} disagrees with ours: max abs diff {diffs[name]:.3g}"
    floors = head_sweep_flops(s)
    patches = s.layers * s.seq * s.heads
    print(f"\nhead sweep: layers.{{0..{s.layers - 1}}}.attention_heads x {s.seq} positions x {s.heads} heads "
          f"({patches} patches), batch of {s.batch} pairs x {s.seq} tokens, metric: mean logit difference")
    print(f"{'tool':<20}{'s':>10}{'tool/ours':>11}{'floor':>8}{'max|diff|':>11}")
    for name, t in times.items():
        floor = floors[name] / floors["ours"]
        print(f"{name:<20}{t:>10.2f}{t / times['ours']:>11.2f}{floor:>8.2f}{diffs[name]:>11.2g}")
        results[f"head_sweep_floor_vs_{name}"] = round(floor, 2)
        results[f"head_sweep_diff_{name}"] = diffs[name]
        if name != "ours":
            results[f"head_sweep_speedup_vs_{name}"] = round(t / times["ours"], 2)
    results["head_sweep_s"] = {k: round(v, 3) for k, v in times.items()}


# -- sweep memory ---------------------------------------------------------------------------------
_MEMORY_CHILD = """
import resource, sys, warnings
sys.path.insert(0, {root!r}); warnings.filterwarnings("ignore")
import torch, transformers as tf
tf.logging.set_verbosity_error(); torch.set_num_threads(1)
from interventions import patching_sweep
k, with_metric = {k}, {with_metric}
torch.manual_seed(0)
model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size={vocab}, n_positions=256,
                                         use_cache=False)).eval()
gen = torch.Generator().manual_seed(0)
base, source = (torch.randint(0, {vocab}, ({batch}, {seq}), generator=gen) for _ in range(2))
metric = (lambda logits: (logits[:, 1] - logits[:, 2]).mean()) if with_metric else None
with torch.no_grad():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    patching_sweep(model, base, source, positions=list(range(k)), site="attention_heads", metric=metric)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def sweep_memory(quick: bool, results: dict) -> None:
    """Peak memory (RSS growth, MB) of a head sweep as the number of patched positions grows, with and
    without a metric: with one, each chunk is reduced as it comes; without, the returned logits grow."""
    import subprocess

    vocab, batch, seq, ks = (1000, 2, 16, (2, 8)) if quick else (50257, 4, 128, (2, 8, 32, 128))
    no_metric_up_to = 8 if quick else 32  # without a metric the logits grow by definition (k=128: 3.3 GB)
    root = str(Path(__file__).resolve().parents[1])
    print(f"\nsweep memory: 4-layer width-128 GPT-2, vocab {vocab}, batch {batch} x {seq} tokens, "
          "site attention_heads (4 heads), k positions; peak RSS growth of a fresh process (MB)")
    print(f"{'k':>4}{'copies':>8}{'metric':>10}{'no metric':>11}")
    for k in ks:
        row = []
        for with_metric in (True, False):
            if not with_metric and k > no_metric_up_to:
                row.append(float("nan"))
                continue
            code = _MEMORY_CHILD.format(root=root, k=k, with_metric=with_metric, vocab=vocab, batch=batch, seq=seq)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            row.append(float(out.stdout.strip().splitlines()[-1]))
        print(f"{k:>4}{4 * k * 4:>8}{row[0]:>10.0f}{row[1]:>11.0f}")
        results[f"sweep_memory_mb_k{k}"] = {"metric": round(row[0]),
                                            "no_metric": None if row[1] != row[1] else round(row[1])}


def _attribution_part(name: str):
    def run(quick: bool, results: dict) -> None:
        import research_attribution as bench  # beside this file

        s = bench.QUICK if quick else bench.FULL
        results.update(bench.COMPARISONS[name](s, bench.build_model(s)))
    return run


PARTS = {"head_sweep": lambda quick, results: head_sweep(HEAD_SWEEP_QUICK if quick else HEAD_SWEEP_FULL, results),
         "sweep_memory": sweep_memory, "attribution": _attribution_part("attribution"),
         "qk_fix": _attribution_part("qk_fix")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test of the whole script")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; timed in process CPU time)")
    parser.add_argument("--only", choices=sorted(PARTS), action="append", help="run only these parts")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.threads == 1:  # CPU time of this process: what the work costs, not how long others held the core
        use_process_time()
    print(f"torch {torch.__version__}, transformers {tf.__version__}, transformer-lens "
          f"{version('transformer-lens')}, nnsight {version('nnsight')}; {torch.get_num_threads()} thread(s), "
          f"{'process CPU time' if args.threads == 1 else 'wall time'}, load average {os.getloadavg()[0]:.1f}")
    results: dict = {"quick": args.quick}
    for name in args.only or list(PARTS):
        PARTS[name](args.quick, results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
