"""Cost of one distillation step on CPU: standard KD vs DIITO (ours) vs a naive 3-pass DIITO reference.

Same batch, same models (a 6-layer BERT teacher and a 3-layer student, width 256), same optimizer.
- standard: ce + mlm + cos (teacher forward, student forward + backward).
- diito (ours): + the DIITO KL; sources read from the standard pass, lower blocks replayed
  (applications.distill.step.distill_losses / interventions.replay_blocks).
- naive: the official code's cost: teacher and student each run base, source (full, with the head)
  and counterfactual passes; gradients flow through the student's source pass.
The FULL alignment's three (student, teacher) pairs are cycled, so figures are the per-step average.
Time: median seconds per step, the methods interleaved step by step. Memory: peak bytes in use by the C allocator (glibc mallinfo2,
sampled after every module call and around backward) above the level before the step, averaged over
the pairs (measured in separate, untimed steps).
Checks that, with dropout off, ours and naive give the same loss (1e-5). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import statistics
import time

import torch
import transformers as tf

from applications.distill import seeding
from applications.distill.objectives import cosine_loss, kd_loss, mlm_loss
from applications.distill.pairing import draw_plan, source_permutation
from applications.distill.step import Objectives, aligned_pairs, distill_losses
from applications.distill.student import build_student
from interventions import record_blocks, set_value


# -- memory: bytes in use by malloc (torch's CPU allocator goes through it) ----------------------
class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


try:
    _mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    _mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):  # not glibc >= 2.33: memory is not measured
    _mallinfo2 = None


def in_use() -> int:
    if _mallinfo2 is None:
        return 0
    m = _mallinfo2()
    return m.uordblks + m.hblkhd


class PeakMemory:
    """Peak of `in_use()` sampled after every module call of the given models (and on demand)."""

    def __init__(self, *models):
        self.models, self.handles, self.peak = models, [], 0

    def sample(self, *_):
        self.peak = max(self.peak, in_use())

    def __enter__(self):
        self.base = in_use()
        self.peak = self.base
        for m in self.models:
            for mod in m.modules():
                self.handles.append(mod.register_forward_hook(self.sample))
        return self

    def __exit__(self, *exc):
        self.sample()
        for h in self.handles:
            h.remove()

    @property
    def delta(self) -> int:
        return self.peak - self.base


# -- the three methods ------------------------------------------------------------------------------
STANDARD = {"ce": 1 / 3, "mlm": 1 / 3, "cos": 1 / 3}
DIITO = {"ce": 0.25, "mlm": 0.25, "cos": 0.25, "diito": 0.25}


def ours(student, teacher, batch, weights, plan, pair):
    return distill_losses(student, teacher, batch["inputs"], batch["labels"], Objectives(weights), plan, pair)["loss"]


def naive(student, teacher, batch, weights, plan, pair):
    """The official cost: base, source and counterfactual passes through both models (full, with heads)."""
    inputs, labels = batch["inputs"], batch["labels"]
    mask = inputs["attention_mask"]
    s_layer, t_layers = pair
    source = {k: v[plan.perm] for k, v in inputs.items()}
    unperm = torch.argsort(plan.perm)
    last_t, last_s = teacher.config.num_hidden_layers - 1, student.config.num_hidden_layers - 1

    def three_passes(model, layers, last):
        with record_blocks(model, [last]) as rec:  # base pass
            base_logits = model(**inputs).logits
        with record_blocks(model, layers) as src:  # source pass: whole model, head included (as the official code)
            model(**source)
        with set_value(model, {f"layers.{j}.output": (lambda cur, j=j: plan.mix(cur, src.value(j)[unperm]))
                               for j in layers}):
            cf = model(**inputs)  # counterfactual pass
        return base_logits, rec.value(last), cf.logits

    with torch.no_grad():
        t_logits, t_last, t_cf = three_passes(teacher, t_layers, last_t)
    s_logits, s_last, s_cf = three_passes(student, (s_layer,), last_s)
    losses = {"mlm": mlm_loss(s_logits, labels), "ce": kd_loss(s_logits, t_logits, mask),
              "cos": cosine_loss(s_last, t_last, mask), "diito": kd_loss(s_cf, t_cf, mask)}
    return sum(weights[k] * losses[k] for k in weights)


METHODS = {"standard": (ours, STANDARD), "diito": (ours, DIITO), "naive": (naive, DIITO)}


# -- setup ----------------------------------------------------------------------------------------
def build(width: int, vocab: int, seq: int, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    teacher = tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=6, num_attention_heads=4, intermediate_size=4 * width,
        max_position_embeddings=max(64, seq), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    student = build_student(teacher, 3)  # teacher layers 0, 2, 4
    teacher.eval().requires_grad_(False)
    student.eval()  # dropout off (it is 0 anyway): losses comparable across methods
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    attn = (torch.arange(seq)[None] < lengths[:, None]).long()
    labels = torch.where((torch.rand(batch, seq, generator=g) < 0.15) & attn.bool(), ids, torch.full_like(ids, -100))
    inputs = {"input_ids": ids * attn, "attention_mask": attn}
    plans = [draw_plan(attn, [seeding.generator(seed, s, i) for i in range(batch)],
                       source_permutation(batch, seeding.generator(seed, s)), "consecutive", 0.3) for s in range(3)]
    pairs = aligned_pairs("full", 3, 6)
    return teacher, student, {"inputs": inputs, "labels": labels}, plans, pairs


def work_floor(width: int, vocab: int, seq: int, pairs) -> dict:
    """Ratios of multiply-adds per step implied by the config (backward = 2x forward for the student)."""
    block = 4 * width ** 2 + 2 * width * 4 * width + 2 * seq * width
    head = width ** 2 + width * vocab
    t_fwd, s_fwd = 6 * block + head, 3 * block + head
    standard = t_fwd + 3 * s_fwd
    extra = statistics.mean(((6 - 1 - min(t)) * block + head) + 3 * ((3 - 1 - s) * block + head) for s, t in pairs)
    diito = standard + extra
    naive_cost = 3 * t_fwd + 3 * 3 * s_fwd
    # memory: activations the student keeps for backward (a block ~ 12 widths + 4 FFN widths per token, a head
    # ~ 3 vocab rows) plus teacher logits held until the loss.
    act_b, act_h = 12 * width + 4 * 4 * width + 2 * 4 * seq, 3 * vocab
    mem_std = 3 * act_b + act_h + vocab
    mem_diito = mem_std + statistics.mean((3 - 1 - s) * act_b + act_h for s, _ in pairs) + vocab
    return {"time_diito_vs_standard": diito / standard, "time_naive_vs_diito": naive_cost / diito,
            "memory_diito_vs_standard": mem_diito / mem_std}


class Runner:
    """One method with its own copy of the student and its own AdamW (state allocated up front)."""

    def __init__(self, method, student, teacher, batch, plans, pairs):
        self.fn, self.weights = METHODS[method]
        self.student, self.teacher, self.batch, self.plans, self.pairs = copy.deepcopy(student), teacher, batch, plans, pairs
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-9)
        for p in self.student.parameters():
            p.grad = torch.zeros_like(p)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, k: int, mem: PeakMemory | None = None) -> float:
        t0 = time.perf_counter()
        loss = self.fn(self.student, self.teacher, self.batch, self.weights, self.plans[k], self.pairs[k])
        if mem is not None:
            mem.sample()
        loss.backward()
        if mem is not None:
            mem.sample()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def measure(student, teacher, batch, plans, pairs, steps: int) -> dict[str, tuple[float, float]]:
    """Median s/step (methods interleaved step by step, so load changes hit all alike) and mean peak bytes."""
    runners = {m: Runner(m, student, teacher, batch, plans, pairs) for m in METHODS}
    times = {m: [] for m in METHODS}
    names = list(METHODS)
    for i in range(steps + 1):
        k = i % len(pairs)
        for m in names[i % 3:] + names[: i % 3]:  # rotate the order
            dt = runners[m].step(k)
            if i:  # the first round warms up
                times[m].append(dt)
    peaks = {m: [] for m in METHODS}
    for m, runner in runners.items():
        for k in range(len(pairs)):  # memory: one untimed step per aligned pair
            with PeakMemory(runner.student, teacher) as mem:
                runner.step(k, mem)
            peaks[m].append(mem.delta)
    return {m: (statistics.median(times[m]), statistics.mean(peaks[m])) for m in METHODS}


def check_same_loss(student, teacher, batch, plans, pairs) -> float:
    worst = 0.0
    with torch.no_grad():
        for plan, pair in zip(plans, pairs):
            a = float(ours(student, teacher, batch, DIITO, plan, pair))
            b = float(naive(student, teacher, batch, DIITO, plan, pair))
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"fast path {a} != naive reference {b} for pair {pair}"
            worst = max(worst, abs(a - b))
    return worst


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch and fewer steps (under a minute)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seq = args.seq or (32 if args.quick else 64)
    batch = args.batch or (8 if args.quick else 16)
    steps = args.steps or (3 if args.quick else 9)
    teacher, student, data, plans, pairs = build(args.width, args.vocab, seq, batch)
    diff = check_same_loss(student, teacher, data, plans, pairs)
    print(f"config: teacher 6 layers, student 3 layers, width {args.width}, vocab {args.vocab}, batch {batch}x{seq}, "
          f"FULL alignment pairs {pairs}; threads {torch.get_num_threads()}")
    print(f"loss check (dropout off): |ours - naive| = {diff:.2e} <= 1e-5")
    results = measure(student, teacher, data, plans, pairs, steps)
    floor = work_floor(args.width, args.vocab, seq, pairs)
    print(f"{'method':10s} {'s/step':>8s} {'peak MiB':>9s}")
    for m, (t, mem) in results.items():
        print(f"{m:10s} {t:8.4f} {mem / 2 ** 20:9.1f}")
    (t_std, m_std), (t_d, m_d), (t_n, m_n) = (results[m] for m in ("standard", "diito", "naive"))
    out = {"time_ratio": round(t_d / t_std, 3), "memory_ratio": round(m_d / max(m_std, 1), 3),
           "naive_time_ratio": round(t_n / t_d, 3), "naive_memory_ratio": round(m_n / max(m_d, 1), 3),
           "floor_time_ratio": round(floor["time_diito_vs_standard"], 3),
           "floor_memory_ratio": round(floor["memory_diito_vs_standard"], 3),
           "floor_naive_time_ratio": round(floor["time_naive_vs_diito"], 3)}
    print(f"DIITO / standard time   {out['time_ratio']:.2f}  (target <= 1.8; work floor {out['floor_time_ratio']:.2f})")
    print(f"DIITO / standard memory {out['memory_ratio']:.2f}  (target <= 1.8; activation floor "
          f"{out['floor_memory_ratio']:.2f})")
    print(f"naive / DIITO time      {out['naive_time_ratio']:.2f}  (target >= 1.6; work floor "
          f"{out['floor_naive_time_ratio']:.2f})")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
