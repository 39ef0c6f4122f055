"""Offline teacher logits: what the top-k approximation does to the KD loss, what the shards cost on
disk, and a KD step with the live teacher vs offline top-32 logits (memory, time).

1. Approximation (a causal demo teacher): a 6-layer GPT-2 (width 96, BPE vocabulary of the grammar
   corpus) pretrained on the project's grammar corpus, its logits written by `write_teacher_logits`
   at K = 8, 32, 128 and read back through `OfflineTeacherLogits`; on held-out batches, for a
   3-layer student copied from the teacher (as `train` builds it) and one distilled briefly from the
   live teacher, the KD loss against the top-k renormalised teacher vs the full one at T = 1 and 2:
   relative error, and the cosine between the two losses' gradients w.r.t. the student's logits.
2. Disk: bytes of the shards per million tokens at each K (float32 values, int32 indices, float32
   log-sum-exp and gold logit: 8K + 8 bytes a token, plus 8 bytes of offsets per example).
3. Step (a 12-layer GPT-2-small-sized teacher, width 768, vocabulary 50257, random weights; a 6-layer
   student copied from it; batch 4 x 128; AdamW): one KD step (`ce`, T = 2) with the live teacher
   vs from top-32 logits. Time: CPU seconds of this process per step (time.process_time), median of
   the timed steps; memory: peak bytes in use by malloc (torch's CPU allocator) during the step and
   the bytes held before it (models, optimizer state, gradients), as in benchmarks/distill_step.py;
   each mode runs in a process of its own.
`--quick` shrinks everything (seconds; a smoke test). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

from applications.distill.config import DistillConfig
from applications.distill.corpus import make_corpus
from applications.distill.data import Collator, TokenizedTexts, train_tokenizer
from applications.distill.objectives.kd import kd_loss
from applications.distill.objectives.topk import topk_kd_loss
from applications.distill.run import pretrain
from applications.distill.student import build_student
from applications.distill.teacher_logits import (
    Manifest,
    OfflineCollator,
    OfflineTeacherLogits,
    release,
    teacher_rows,
    write_teacher_logits,
)
from benchmarks.distill_step import PeakMemory, in_use

tf.logging.set_verbosity_error()
KS = (8, 32, 128)


def gpt2(vocab, layers, width, heads, positions=128):
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads,
                                            n_positions=positions, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def approximation(root: Path, quick: bool) -> dict:
    texts = make_corpus(800 if quick else 6000, seed=0)
    held = make_corpus(64 if quick else 256, seed=1)
    tok = train_tokenizer(texts, 1024, causal=True)
    torch.manual_seed(0)
    teacher = gpt2(len(tok), 2 if quick else 6, 32 if quick else 96, 4)
    steps = 30 if quick else 900
    pretrain(teacher, tok, texts, DistillConfig(output_dir=str(root / "pretrain"), max_steps=steps, batch_size=32,
                                                max_length=48, learning_rate=2e-3, save_steps=10 ** 9, progress=False,
                                                plot=False, logging_steps=10 ** 6))
    teacher.eval().save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    (root / "held.txt").write_text("\n".join(held) + "\n")
    disk = {}
    for k in KS:
        s = write_teacher_logits(str(root / "teacher"), str(root / "held.txt"), k, str(root / f"k{k}"), max_length=48)
        disk[k] = s["bytes_per_million_tokens"]
    students = {"copied": build_student(teacher, 1 if quick else 3).eval()}
    distilled = build_student(teacher, 1 if quick else 3)
    opt = torch.optim.AdamW(distilled.parameters(), lr=1e-3)
    data = TokenizedTexts(texts[:512], tok, 48, 2)
    col = Collator(tok.pad_token_id)
    for i in range(20 if quick else 150):  # a short KD run with the live teacher
        b = col([data[j] for j in range(i * 8 % 504, i * 8 % 504 + 8)])
        with torch.no_grad():
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = kd_loss(distilled(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, t,
                       b["attention_mask"], 2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    students["distilled"] = distilled.eval()
    held_data = TokenizedTexts(held, tok, 48, 2)
    rows = []
    for name, student in students.items():
        for temperature in (1.0, 2.0):
            row = {"student": name, "T": temperature}
            full_sum, parts = 0.0, {k: [0.0, 0.0, 0.0] for k in KS}
            datasets = {k: OfflineTeacherLogits(held_data, root / f"k{k}", Manifest.read(root / f"k{k}")) for k in KS}
            ocol = OfflineCollator(tok.pad_token_id)
            for start in range(0, len(held_data), 16):
                index = range(start, min(start + 16, len(held_data)))
                b = col([held_data[j] for j in index])
                mask = b["attention_mask"]
                with torch.no_grad():
                    t = teacher(input_ids=b["input_ids"], attention_mask=mask).logits
                    s_logits = student(input_ids=b["input_ids"], attention_mask=mask).logits
                s_logits.requires_grad_(True)
                full = kd_loss(s_logits, t, mask, temperature)
                (g_full,) = torch.autograd.grad(full, s_logits)
                full_sum += float(full.detach()) * mask.sum().item()
                for k in KS:
                    ob = ocol([datasets[k][j] for j in index])
                    approx = topk_kd_loss(s_logits, ob["teacher_values"], ob["teacher_indices"], mask, temperature)
                    (g,) = torch.autograd.grad(approx, s_logits)
                    cos = torch.nn.functional.cosine_similarity(g.flatten(), g_full.flatten(), dim=0)
                    parts[k][0] += float(approx.detach()) * mask.sum().item()
                    parts[k][1] += float(cos) * mask.sum().item()
                    p = torch.softmax(t / temperature, -1).topk(k, -1).values.sum(-1)
                    parts[k][2] += float((p * mask).sum())
            n = sum(len(x) for x in held_data.examples)
            row["full"] = round(full_sum / n, 4)
            for k in KS:
                row[f"k{k}"] = round(parts[k][0] / n, 4)
                row[f"k{k}_rel_err"] = round(parts[k][0] / full_sum - 1, 4)
                row[f"k{k}_grad_cos"] = round(parts[k][1] / n, 4)
                row[f"k{k}_teacher_mass"] = round(parts[k][2] / n, 4)
            rows.append(row)
    return {"vocab": len(tok), "teacher_layers": teacher.config.n_layer, "width": teacher.config.n_embd,
            "teacher_steps": steps, "kd": rows, "bytes_per_million_tokens": disk}


def kd_step(student, teacher, opt, ids, mask, stored) -> None:
    """One KD step (T = 2): against the live teacher, or against `stored` top-k logits when it is None."""
    logits = student(input_ids=ids, attention_mask=mask).logits
    if teacher is not None:
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=mask).logits
        loss = kd_loss(logits, t, mask, 2.0)
    else:
        loss = topk_kd_loss(logits, stored["teacher_values"], stored["teacher_indices"], mask, 2.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def step_cost(quick: bool, steps: int, modes=("live", "offline_top32")) -> dict:
    vocab, layers, width, heads, batch, seq = (2000, 4, 64, 4, 4, 32) if quick else (50257, 12, 768, 12, 4, 128)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    results = {"process_before_models_mb": round(in_use() / 2**20, 1)}
    for mode in modes:
        teacher = gpt2(vocab, layers, width, heads).eval().requires_grad_(False)
        student = build_student(teacher, layers // 2)
        if mode == "offline_top32":  # written once, beforehand; the teacher is then dropped
            feats = teacher_rows(teacher, ids.tolist(), 0, 32, "cpu")
            release(teacher)  # the toolkit's site-graph cache would keep it alive (see teacher_logits.release)
            teacher = None
            b = OfflineCollator(0)([{"input_ids": x, "idx": i, **{"teacher_" + k: v for k, v in r.items()}}
                                    for i, (x, r) in enumerate(zip(ids.tolist(), feats))])
        else:
            b = None
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        kd_step(student, teacher, opt, ids, mask, b)  # optimizer state allocated
        held = in_use()
        times, peaks = [], []
        for _ in range(steps):
            models = [m for m in (student, teacher) if m is not None]
            t0 = time.process_time()
            with PeakMemory(*models) as pm:
                kd_step(student, teacher, opt, ids, mask, b)
            times.append(time.process_time() - t0)
            peaks.append(pm.peak)
        results[mode] = {"s_per_step": round(statistics.median(times), 3), "peak_mb": round(max(peaks) / 2**20, 1),
                         "held_before_step_mb": round(held / 2**20, 1)}
        for m in (student, teacher):
            if m is not None:
                release(m)
        del student, opt, teacher, models, pm, b  # nothing of this mode stays alive into the next
        gc.collect()
    results["config"] = {"vocab": vocab, "teacher_layers": layers, "width": width, "batch": batch, "seq": seq,
                         "student_layers": layers // 2}
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="timed KD steps per mode (part 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--skip-step", action="store_true", help="skip part 3 (the GPT-2-small step)")
    parser.add_argument("--only-step", action="store_true", help="run part 3 only")
    parser.add_argument("--modes", default="live,offline_top32", help="part 3's modes, in this order")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {}
    if not args.only_step:
        with tempfile.TemporaryDirectory() as tmp:
            out["approximation"] = approximation(Path(tmp), args.quick)
        print(json.dumps(out["approximation"], indent=1))
    if not args.skip_step:
        modes = args.modes.split(",")
        if len(modes) == 1:
            out["step"] = step_cost(args.quick, args.steps, tuple(modes))
        else:  # each mode in a process of its own: nothing of one can stay allocated into the other
            out["step"] = {}
            for mode in modes:
                cmd = [sys.executable, "-m", "benchmarks.teacher_logits", "--only-step", "--modes", mode,
                       "--steps", str(args.steps), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                out["step"].update(json.loads(line)["step"])
            if {"live", "offline_top32"} <= set(out["step"]):
                out["step"]["ratio_live_over_offline"] = {
                    k: round(out["step"]["live"][k] / out["step"]["offline_top32"][k], 2)
                    for k in ("s_per_step", "peak_mb", "held_before_step_mb")}
        print(json.dumps(out["step"], indent=1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
