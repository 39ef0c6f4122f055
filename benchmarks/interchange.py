"""Side-by-side speed of interchange interventions: this library vs pyvene, TransformerLens and nnsight.

Run: ``python benchmarks/interchange.py [--quick]``. One random GPT-2-sized model (no downloads), CPU,
every tool on the SAME weights, outputs checked against ours (max abs diff <= 1e-5) before timing.
(a) one interchange of layers.{L}.output at one position; (b) an activation-patching sweep of every
layer x position, metric = logit difference of two tokens at the final position. The last output
line is one JSON object with the ratios. Method and figures: docs/benchmarks.md.
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

from benchmarks.common import clock_name, median_times, random_gpt2, use_process_time, version
from interventions import Site, interchange, patching_sweep

tf.logging.set_verbosity_error()
TOL = 1e-5


# -- set-up ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """Model size and workload of one benchmark run."""

    layers: int
    width: int
    heads: int
    vocab: int
    single_batch: int
    single_seq: int
    sweep_seq: int
    single_repeats: int
    sweep_repeats: int


FULL = Setup(layers=12, width=768, heads=12, vocab=50257, single_batch=8, single_seq=32, sweep_seq=16,
             single_repeats=9, sweep_repeats=2)
QUICK = Setup(layers=4, width=256, heads=4, vocab=5000, single_batch=4, single_seq=16, sweep_seq=8,
              single_repeats=7, sweep_repeats=1)


def build_model(s: Setup) -> tf.GPT2LMHeadModel:
    return random_gpt2(s.layers, s.width, s.heads, s.vocab)


# -- work floors (FLOPs; a multiply-add counts 2) -------------------------------------------------
def block_flops(s: Setup, seq: int) -> float:
    """One block on one token: QKV + output projections (8 H^2), MLP H->4H->H (16 H^2), scores + mix (4 S H)."""
    return 24 * s.width ** 2 + 4 * seq * s.width


def head_flops(s: Setup) -> float:
    """The LM head on one position: H x V."""
    return 2 * s.width * s.vocab


def forward_flops(s: Setup, tokens: int, seq: int, blocks: int, head_positions: int) -> float:
    return tokens * blocks * block_flops(s, seq) + head_positions * head_flops(s)


# -- peers ----------------------------------------------------------------------------------------
def load_peers():
    """Import each peer; a peer that cannot load is reported, never silently dropped."""
    peers, missing = {}, {}
    for name, module in (("pyvene", "pyvene"), ("transformer_lens", "transformer_lens"), ("nnsight", "nnsight")):
        try:
            peers[name] = __import__(module)
        except Exception as e:  # noqa: BLE001 - report any import failure
            missing[name] = f"{type(e).__name__}: {e}"
    return peers, missing


def pyvene_model(pv, model, layer: int):
    """A pyvene IntervenableModel swapping block_output (= layers.{layer}.output) at chosen positions."""
    config = pv.IntervenableConfig(
        representations=[pv.RepresentationConfig(layer, "block_output", "pos", 1)],
        intervention_types=pv.VanillaIntervention,
    )
    wrapped = pv.IntervenableModel(config, model=model)
    wrapped.disable_model_gradients()
    return wrapped


def tl_bridge(model):
    """TransformerLens 4 wraps an HF model in a TransformerBridge (it edits the model it gets: a copy)."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    bridge = build_bridge_from_module(copy.deepcopy(model), "GPT2LMHeadModel", hf_config=model.config)
    return bridge.eval()


# -- (a) a single interchange ---------------------------------------------------------------------
def single(s: Setup, model, peers, results: dict, notes: list) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, s.vocab, (s.single_batch, s.single_seq), generator=gen)
    source = torch.randint(0, s.vocab, (s.single_batch, s.single_seq), generator=gen)
    layer, pos = s.layers // 2, s.single_seq // 2
    site = Site(f"layers.{layer}.output", positions=[pos])
    tokens = s.single_batch * s.single_seq
    full_run = forward_flops(s, tokens, s.single_seq, s.layers, tokens)
    floors = {"ours": forward_flops(s, tokens, s.single_seq, layer + 1, 0) + full_run}

    def ours():
        return interchange(model, base, source, site).logits

    runs = {"ours": ours}
    if "pyvene" in peers:
        wrapped = pyvene_model(peers["pyvene"], model, layer)
        locations = {"sources->base": ([[[pos]] * s.single_batch], [[[pos]] * s.single_batch])}

        def pyvene():
            return wrapped({"input_ids": base}, [{"input_ids": source}], unit_locations=locations)[1].logits

        runs["pyvene"] = pyvene
        floors["pyvene"] = 2 * full_run  # pyvene runs the source to the end, head included
    if "nnsight" in peers:
        traced = peers["nnsight"].NNsight(copy.deepcopy(model))  # it rewraps every forward: a copy

        def nnsight():
            with traced.trace(source) as tracer:
                value = traced.transformer.h[layer].output[:, pos, :].save()
                tracer.stop()  # nnsight's early stop: the source needs layers 0..layer only
            with traced.trace(base):
                traced.transformer.h[layer].output[:, pos, :] = value
                logits = traced.output.logits.save()
            return logits

        runs["nnsight"] = nnsight
        floors["nnsight"] = floors["ours"]
    with torch.no_grad():
        reference = ours()
        for name, fn in runs.items():
            diff = (fn() - reference).abs().max().item()
            results[f"single_diff_{name}"] = diff
            assert diff <= TOL, f"(a) {name} disagrees with ours: max abs diff {diff:.3g} > {TOL}"
        times = median_times(runs, s.single_repeats, warmup=1)  # + the check call above
    print(f"\n(a) one interchange of layers.{layer}.output at position {pos}, base/source "
          f"[{s.single_batch} x {s.single_seq}], median of {s.single_repeats}")
    print(f"{'tool':<18}{'ms':>10}{'ours/tool':>12}{'floor':>9}{'max|diff|':>12}")
    for name, t in times.items():
        ratio = times["ours"] / t
        floor = floors["ours"] / floors[name]
        print(f"{name:<18}{t * 1e3:>10.1f}{ratio:>12.3f}{floor:>9.3f}{results[f'single_diff_{name}']:>12.2g}")
        if name != "ours":
            results[f"single_ratio_vs_{name}"] = round(ratio, 3)
            results[f"single_floor_vs_{name}"] = round(floor, 3)
    results["single_ms"] = {k: round(v * 1e3, 2) for k, v in times.items()}
    return times


# -- (b) an activation-patching sweep -------------------------------------------------------------
def sweep(s: Setup, model, peers, results: dict, notes: list) -> dict[str, float]:
    gen = torch.Generator().manual_seed(2)
    seq, n = s.sweep_seq, s.layers
    base = torch.randint(0, s.vocab, (1, seq), generator=gen)
    source = torch.randint(0, s.vocab, (1, seq), generator=gen)
    good, bad = 11, 13  # metric: logit[good] - logit[bad] at the final position

    def metric(logits):  # [..., seq, vocab] -> [...]
        return logits[..., -1, good] - logits[..., -1, bad]

    def ours():
        out = patching_sweep(model, base, source)  # [layers, positions, vocab]
        return out[..., good] - out[..., bad]

    full = forward_flops(s, seq, seq, n, seq)
    patched_rows = sum(seq * (n - 1 - layer) for layer in range(n))  # copies run the blocks above their layer
    floors = {"ours": forward_flops(s, seq, seq, n, 0)  # source: every block, no head
              + forward_flops(s, seq * (patched_rows + n), seq, 1, 1 + n * seq)}  # base: clean row + copies
    runs = {"ours": ours}
    if "pyvene" in peers:
        pv = peers["pyvene"]
        wrapped = [pyvene_model(pv, model, layer) for layer in range(n)]
        one = {"input_ids": base}, [{"input_ids": source}]

        def pyvene_per_site():
            out = torch.empty(n, seq)
            for layer in range(n):
                for p in range(seq):
                    logits = wrapped[layer](*one, unit_locations={"sources->base": ([[[p]]], [[[p]]])})[1].logits
                    out[layer, p] = metric(logits)[0]
            return out

        bases, sources = {"input_ids": base.expand(seq, -1)}, [{"input_ids": source.expand(seq, -1)}]
        per_example = [[[p] for p in range(seq)]]

        def pyvene_batched():  # pyvene's batched usage: one call per layer, one example per position
            rows = [wrapped[layer](bases, sources, unit_locations={"sources->base": (per_example, per_example)})[1]
                    for layer in range(n)]
            return torch.stack([metric(r.logits) for r in rows])

        runs["pyvene (per site)"] = pyvene_per_site
        runs["pyvene (batched)"] = pyvene_batched
        floors["pyvene (per site)"] = floors["pyvene (batched)"] = n * seq * 2 * full
    if "transformer_lens" in peers:
        from transformer_lens import patching as tl_patching

        tl_patching.tqdm = lambda it, **_: it  # silence its progress bar (output only)
        bridge = tl_bridge(model)

        def transformer_lens():
            _, cache = bridge.run_with_cache(source, names_filter=lambda name: name.endswith("hook_resid_post"))
            return tl_patching.generic_activation_patch(
                bridge, base, cache, lambda logits: metric(logits)[0], tl_patching.layer_pos_patch_setter,
                "resid_post", index_axis_names=("layer", "pos"))

        runs["transformer_lens"] = transformer_lens
        floors["transformer_lens"] = (n * seq + 1) * full
    if "nnsight" in peers:
        nnsight_lib = peers["nnsight"]
        traced = nnsight_lib.NNsight(copy.deepcopy(model))  # it rewraps every forward: a copy
        blocks = traced.transformer.h

        def nnsight():
            with traced.trace(source) as tracer:  # nnsight keeps only what is saved: save the list
                values = nnsight_lib.save([blocks[layer].output for layer in range(n)])
                tracer.stop()  # no head needed
            out = torch.empty(n, seq)
            for layer in range(n):
                for p in range(seq):
                    with traced.trace(base):
                        blocks[layer].output[:, p, :] = values[layer][:, p, :]
                        value = metric(traced.output.logits).save()
                    out[layer, p] = value[0]
            return out

        runs["nnsight"] = nnsight
        floors["nnsight"] = n * seq * full + forward_flops(s, seq, seq, n, 0)
    with torch.no_grad():
        reference = ours()
        for name, fn in runs.items():
            diff = (fn() - reference).abs().max().item()
            results[f"sweep_diff_{name}"] = diff
            assert diff <= TOL, f"(b) {name} disagrees with ours: max abs diff {diff:.3g} > {TOL}"
        times = median_times(runs, s.sweep_repeats, warmup=0)  # the check call above warmed up
    print(f"\n(b) patching sweep of layers.{{0..{n - 1}}}.output x {seq} positions ({n * seq} patched runs), "
          f"base/source [1 x {seq}], metric logit[{good}] - logit[{bad}] at the last position")
    print(f"{'tool':<20}{'s':>9}{'tool/ours':>12}{'floor':>9}{'max|diff|':>12}")
    for name, t in times.items():
        speedup = t / times["ours"]
        floor = floors[name] / floors["ours"]
        print(f"{name:<20}{t:>9.3f}{speedup:>12.2f}{floor:>9.2f}{results[f'sweep_diff_{name}']:>12.2g}")
        results[f"sweep_floor_vs_{name}"] = round(floor, 2)
    results["sweep_s"] = {k: round(v, 4) for k, v in times.items()}
    if "pyvene" in peers:
        best = min(times["pyvene (per site)"], times["pyvene (batched)"])
        results["sweep_speedup_vs_pyvene"] = round(best / times["ours"], 2)
        results["sweep_speedup_vs_pyvene_per_site"] = round(times["pyvene (per site)"] / times["ours"], 2)
    for name in ("transformer_lens", "nnsight"):
        if name in times:
            results[f"sweep_speedup_vs_{name}"] = round(times[name] / times["ours"], 2)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model (4 layers, width 256): < 1 min")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: all cores; use 1 on a machine busy with other jobs, "
                             "where multi-threaded runs time scheduler stalls rather than work)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    if args.threads == 1:  # CPU time of this process: what the work costs, not how long others held the core
        use_process_time()
    clock = clock_name()
    peers, missing = load_peers()
    print(f"torch {torch.__version__}, transformers {tf.__version__}, {torch.get_num_threads()} threads on "
          f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}), "
          f"GPT-2 config: {s.layers} layers, width {s.width}, {s.heads} heads, vocab {s.vocab} (random weights)")
    versions = {name: version(name) for name in peers}
    print(f"timing: {clock}, median over interleaved rounds")
    print("peers:", ", ".join(f"{k} {v}" for k, v in versions.items()) or "none")
    for name, why in missing.items():
        print(f"NOTE: {name} could not be loaded offline ({why}); it is left out of the comparison.")
    model = build_model(s)
    results: dict = {"quick": args.quick}
    notes: list = []
    single(s, model, peers, results, notes)
    sweep(s, model, peers, results, notes)
    print("\nfloor = the ratio of FLOPs each method must do (see docs/benchmarks.md); every peer's output "
          f"matched ours within {TOL} (max|diff| column).")
    for note in notes:
        print("NOTE:", note)
    keys = ["single_ratio_vs_pyvene", "sweep_speedup_vs_pyvene", "sweep_speedup_vs_transformer_lens",
            "sweep_speedup_vs_nnsight", "single_ratio_vs_nnsight"]
    summary = {k: results[k] for k in keys if k in results}
    summary.update({k: v for k, v in results.items() if k not in summary})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
