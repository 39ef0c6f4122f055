"""Cost of reading one layer's attention pattern, next to a plain sdpa forward of the same model.

Run: ``python benchmarks/attention_pattern.py [--quick] [--threads 1]``. One random GPT-2-small-sized
model (12 layers, width 768, 12 heads; no downloads), CPU, float32, eval, no grad. Timed side by side,
interleaved, median over rounds (process CPU time with one thread, else wall time):

- ``plain sdpa``: ``model.transformer(x)`` (the base model, no head), attention on sdpa;
- ``pattern, full forward``: the same forward with ``layers.{L}.attention_pattern`` read by a
  ``set_value`` callable: layer L computes its softmax explicitly, the other 11 stay on sdpa;
- ``get_value(pattern)``: ``get_value(model, x, "layers.{L}.attention_pattern")`` (stops after it);
- ``plain eager``: the same weights built with ``attn_implementation="eager"`` (every layer explicit).

Before timing, the pattern read is checked against the eager model's ``output_attentions`` (1e-5).
The last output line is one JSON object with the times and ratios. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers as tf

from benchmarks.common import clock_name, median_times, random_gpt2, use_process_time
from interventions import get_value, set_value

tf.logging.set_verbosity_error()


def build(layers: int, width: int, heads: int, vocab: int, impl: str) -> tf.GPT2LMHeadModel:
    return random_gpt2(layers, width, heads, vocab, attn=impl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, width 256, shorter inputs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1: time in process CPU time)")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.threads == 1:
        use_process_time()
    layers, width, heads, vocab = (4, 256, 4, 5000) if args.quick else (12, 768, 12, 50257)
    batch, seq = (2, 64) if args.quick else (4, 256)
    rounds = args.rounds or (5 if args.quick else 7)
    layer = layers // 2
    site = f"layers.{layer}.attention_pattern"

    sdpa = build(layers, width, heads, vocab, "sdpa")
    eager = build(layers, width, heads, vocab, "eager")
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    seen = {}

    def keep(cur):
        seen["pattern"] = cur
        return cur

    with torch.no_grad():
        reference = eager.transformer(x, output_attentions=True).attentions[layer]
        got = get_value(sdpa, x, site)[site]
        err = (got - reference).abs().max().item()
        assert err <= 1e-5, f"pattern differs from the eager model's attentions by {err}"
        with set_value(sdpa, {site: keep}):
            out = sdpa.transformer(x).last_hidden_state
        err_out = (out - sdpa.transformer(x).last_hidden_state).abs().max().item()
        assert err_out <= 1e-4, f"reading the pattern changed the output by {err_out}"

    def plain():
        sdpa.transformer(x)

    def pattern_full():
        with set_value(sdpa, {site: keep}):
            sdpa.transformer(x)

    def pattern_get():
        get_value(sdpa, x, site)

    def plain_eager():
        eager.transformer(x)

    runs = {"plain sdpa": plain, "pattern, full forward": pattern_full, "get_value(pattern)": pattern_get,
            "plain eager": plain_eager}
    with torch.no_grad():
        med = median_times(runs, rounds, warmup=1)
    base = med["plain sdpa"]
    print(f"GPT-2 {layers} layers x {width}, {heads} heads, inputs [{batch} x {seq}], threads "
          f"{torch.get_num_threads()}, {rounds} rounds, clock: {clock_name()}")
    print(f"pattern check vs eager output_attentions: max|diff| = {err:.1e}")
    print(f"{'run':28s} {'median s':>9s} {'x plain sdpa':>13s}")
    for name, t in med.items():
        print(f"{name:28s} {t:9.3f} {t / base:13.3f}")
    print(json.dumps({"layers": layers, "width": width, "batch": batch, "seq": seq, "rounds": rounds,
                      "times": med, "ratios": {k: v / base for k, v in med.items()}, "max_diff": err}))


if __name__ == "__main__":
    main()
