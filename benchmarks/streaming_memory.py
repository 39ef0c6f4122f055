"""Peak memory of a few distillation steps, map-style vs `--streaming`, as the training corpus grows.

Run: ``python benchmarks/streaming_memory.py [--quick]``. A tiny causal GPT-2 teacher (2 layers, width
32, a byte-level BPE tokenizer of 256 tokens trained on the corpus; random weights, no downloads) is
distilled into a 1-layer student for a few steps (objectives ce,clm; batch 8, 64 tokens) from a
generated grammar corpus (corpus.py) of 1x, 4x and 16x `--lines` lines (and 64x, streamed only). Each (mode, size) runs in a
fresh process; it reports the resident set size after the imports ("before") and its peak (VmHWM,
Linux) over the whole `train` call: reading, tokenizing and training. The models are tiny on purpose,
so that what grows is the data path. The last output line is one JSON object; figures:
docs/benchmarks.md.
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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MODES = ("map", "stream")
FACTORS = (1, 4, 16)
#: Streaming only (map-style would take gigabytes and minutes here): the stream's memory stays flat.
STREAM_ONLY = (64,)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, train_file: str, teacher: str, out: str, steps: int) -> dict:
    """One measured `train` call in this process."""
    import torch
    import transformers as tf

    from applications.distill.config import DistillConfig
    from applications.distill.run import train

    tf.logging.set_verbosity_error()
    torch.set_num_threads(1)
    cfg = DistillConfig(teacher=teacher, train_file=train_file, output_dir=out, student_layers=1,
                        objectives="ce,clm", batch_size=8, max_length=64, max_steps=steps, save_steps=10_000,
                        logging_steps=steps, progress=False, plot=False, streaming=mode == "stream")
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    start = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - start
    return {"mode": mode, "rss_before": before, "peak_rss": _status("VmHWM"), "seconds": seconds,
            "steps": summary["global_step"]}


def setup(root: Path, lines: int) -> tuple[Path, dict[int, Path]]:
    """The saved teacher and the corpus files (1x, 4x, 16x, 64x `lines` lines)."""
    import torch
    import transformers as tf

    from applications.distill.corpus import make_corpus
    from applications.distill.data import train_tokenizer

    base = make_corpus(lines, seed=0)
    tok = train_tokenizer(base[:2000], 256, causal=True)
    torch.manual_seed(0)
    teacher = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    files = {}
    block = "\n".join(base) + "\n"
    for f in FACTORS + STREAM_ONLY:
        files[f] = root / f"train_{f}x.txt"
        files[f].write_text(block * f)
    return root / "teacher", files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 lines at 1x (seconds)")
    parser.add_argument("--lines", type=int, default=12_500, help="lines at 1x (default 12,500)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=4, metavar=("MODE", "FILE", "TEACHER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, steps=args.steps)))
        return
    lines = 2_000 if args.quick else args.lines
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher, files = setup(Path(tmp), lines)
        for f in FACTORS + STREAM_ONLY:
            for mode in MODES if f in FACTORS else ("stream",):
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--child", mode, str(files[f]),
                       str(teacher), str(Path(tmp) / f"out_{mode}_{f}")]
                run = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
                row = json.loads(run.stdout.strip().splitlines()[-1])
                row.update(factor=f, lines=lines * f, file_mb=files[f].stat().st_size / 2**20)
                rows.append(row)
                print(f"{mode:6s} {f:3d}x {lines * f:9,d} lines {row['file_mb']:7.1f} MB: peak RSS "
                      f"{row['peak_rss'] / 2**20:8.1f} MiB (before {row['rss_before'] / 2**20:6.1f}), "
                      f"{row['seconds']:6.1f} s", flush=True)
    print("\n| lines | file MB | map-style peak MiB | streaming peak MiB | map / stream | map − before | "
          "stream − before |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for f in FACTORS:
        m, s = (next(r for r in rows if r["factor"] == f and r["mode"] == mode) for mode in MODES)
        print(f"| {m['lines']:,} | {m['file_mb']:.1f} | {m['peak_rss'] / 2**20:.0f} | {s['peak_rss'] / 2**20:.0f} | "
              f"{m['peak_rss'] / s['peak_rss']:.2f} | {(m['peak_rss'] - m['rss_before']) / 2**20:.0f} | "
              f"{(s['peak_rss'] - s['rss_before']) / 2**20:.0f} |")
    for f in STREAM_ONLY:
        s = next(r for r in rows if r["factor"] == f)
        print(f"| {s['lines']:,} | {s['file_mb']:.1f} | (not run) | {s['peak_rss'] / 2**20:.0f} | | | "
              f"{(s['peak_rss'] - s['rss_before']) / 2**20:.0f} |")
    print(json.dumps({"lines_1x": lines, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
