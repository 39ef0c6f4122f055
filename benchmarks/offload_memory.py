"""Peak memory of an interchange on a disk-offloaded model vs the same model in memory.

Run: ``python benchmarks/offload_memory.py [--quick]``. A GPT-2-small-sized model (12 layers, width 768,
vocabulary 50257; random weights, float32, no downloads) is saved once to a temporary directory and
loaded with `from_pretrained` three ways: whole in memory, half of the blocks on "disk"
(``device_map``, accelerate's offload folder), every block and the final norm on "disk". Each
configuration runs in a fresh process: one warm-up interchange, then one measured interchange of
``layers.{L/2}.output`` at one position (batch 4 x 64 tokens, ``torch.no_grad()``), whose logits
must equal the in-memory model's.

Two measures, because neither sees everything:
- tensor memory: the peak of live CPU tensor bytes allocated during the call, from torch's profiler
  (``profile_memory=True``: every allocation and free of torch's CPU allocator), plus the bytes of
  the parameters that stay materialised between calls (not on ``meta``);
- process memory: the peak resident set size during the call (Linux: ``/proc/self/clear_refs`` resets
  VmHWM before the call) and the RSS before it. RSS also counts file pages mapped by the process
  (weights that `from_pretrained` memory-maps from safetensors, accelerate's memory-mapped offload
  files), which the profiler does not see as allocations.
The last output line is one JSON object. Method and figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import transformers as tf

from interventions import Site, interchange

tf.logging.set_verbosity_error()
MODES = ("memory", "half_on_disk", "all_on_disk")


@dataclass(frozen=True)
class Setup:
    layers: int
    width: int
    heads: int
    vocab: int
    batch: int
    seq: int


FULL = Setup(layers=12, width=768, heads=12, vocab=50257, batch=4, seq=64)
QUICK = Setup(layers=4, width=128, heads=4, vocab=2000, batch=2, seq=16)


@dataclass(frozen=True)
class Measure:
    """One configuration's figures (bytes and seconds)."""

    mode: str
    resident_weight_bytes: int   # parameters not on meta between calls
    peak_tensor_bytes: int       # peak of CPU tensor bytes allocated during the call (profiler)
    rss_before_bytes: int
    peak_rss_bytes: int          # VmHWM during the call
    seconds: float               # the measured call, without the profiler


def device_map(mode: str, layers: int) -> dict | None:
    if mode == "memory":
        return None
    on_disk = range(layers // 2, layers) if mode == "half_on_disk" else range(layers)
    dm = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "lm_head": "cpu"}  # lm_head is tied to wte
    dm.update({f"transformer.h.{i}": "disk" if i in on_disk else "cpu" for i in range(layers)})
    dm["transformer.ln_f"] = "disk" if mode == "all_on_disk" else "cpu"
    return dm


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def _peak_tensor_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated while `fn` runs (relative to its start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max([0, *totals])


def child(mode: str, directory: Path, setup: Setup, out: Path) -> None:
    """Load the saved model in `mode`, measure one interchange, write the figures and the logits."""
    torch.set_num_threads(1)  # a memory benchmark: one thread (the machine is shared), timings are indicative
    dm = device_map(mode, setup.layers)
    kwargs = {} if dm is None else {"device_map": dm, "offload_folder": str(out.parent / f"offload-{mode}")}
    model = tf.AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32, **kwargs).eval()
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, setup.vocab, (setup.batch, setup.seq), generator=gen)
    source = torch.randint(0, setup.vocab, (setup.batch, setup.seq), generator=gen)
    site = Site(f"layers.{setup.layers // 2}.output", positions=[3])

    def run():
        return interchange(model, base, source, site).logits

    with torch.no_grad():
        run()  # warm-up: page cache, lazy initialisation
        resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
        rss_before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        start = time.perf_counter()
        logits = run()
        seconds = time.perf_counter() - start
        peak_rss = _status("VmHWM")
        peak_tensor = _peak_tensor_bytes(run)
    torch.save(logits, out.with_suffix(".pt"))
    measure = Measure(mode, resident, peak_tensor, rss_before, peak_rss, seconds)
    out.write_text(json.dumps(asdict(measure)))


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model: a smoke test, not figures")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup = QUICK if args.quick else FULL
    if args.child:
        return child(args.child, args.dir, setup, args.out)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        config = tf.GPT2Config(n_layer=setup.layers, n_embd=setup.width, n_head=setup.heads,
                               vocab_size=setup.vocab, n_positions=max(64, setup.seq))
        tf.GPT2LMHeadModel(config).save_pretrained(tmp / "model")
        results = []
        for mode in MODES:
            out = tmp / f"{mode}.json"
            cmd = [sys.executable, __file__, "--child", mode, "--dir", str(tmp), "--out", str(out)]
            subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
            results.append(Measure(**json.loads(out.read_text())))
        reference = torch.load(tmp / "memory.pt")
        diffs = {m.mode: float((torch.load(tmp / f"{m.mode}.pt") - reference).abs().max()) for m in results}

    print(f"GPT-2 {setup.layers} layers, width {setup.width}, vocab {setup.vocab}; interchange of "
          f"layers.{setup.layers // 2}.output, batch {setup.batch} x {setup.seq} tokens, float32, CPU")
    print(f"{'configuration':<14} {'weights MiB':>11} {'peak tensor MiB':>15} {'RSS before MiB':>14} "
          f"{'peak RSS MiB':>12} {'s/call':>7} {'max |diff|':>10}")
    for m in results:
        print(f"{m.mode:<14} {mib(m.resident_weight_bytes):>11} {mib(m.peak_tensor_bytes):>15} "
              f"{mib(m.rss_before_bytes):>14} {mib(m.peak_rss_bytes):>12} {m.seconds:7.3f} {diffs[m.mode]:10.2e}")
    print(json.dumps({"setup": asdict(setup), "results": [asdict(m) for m in results], "max_abs_diff": diffs}))


if __name__ == "__main__":
    main()
