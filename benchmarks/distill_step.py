"""Cost of one distillation step on CPU: standard KD vs DIITO (ours) vs a naive 3-pass DIITO reference.

Same batch, same models (a 6-layer BERT teacher and a 3-layer student, width 256), same optimizer.
- standard: ce + mlm + cos (teacher forward, student forward + backward).
- diito (ours): + the DIITO KL; sources read from the standard pass, lower blocks replayed
  (applications.distill.diito.step.distill_losses / interventions.replay_blocks).
- naive: the official code's cost: teacher and student each run base, source (full, with the head)
  and counterfactual passes; gradients flow through the student's source pass.
The FULL alignment's three (student, teacher) pairs are cycled, so figures are the per-step average.
Time: CPU seconds of this process per step (time.process_time: on a shared machine, other processes'
load does not enter it), the methods interleaved step by step; `--repeats` independent rounds, each
giving its median per method and its ratios; reported: the median ratio over the rounds and the spread
(half the max - min). Memory: peak bytes in use by the C allocator (glibc mallinfo2, sampled after
every module call and around backward) above the level before the step, averaged over the pairs
(measured in separate, untimed steps).
TED row: one TED stage-2 step (teacher + filters frozen; student + filters trained) through the one
trainer (`ted.stages.stage2`, timed per step by a callback) against a hand-written loop of the same
step (the loop TED had before it ran on the trainer), same models, data and batch.
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
from applications.distill.diito.pairing import draw_plan, source_permutation
from applications.distill.diito.step import Objectives, aligned_pairs, distill_losses
from applications.distill.objectives import cosine_loss, kd_loss, mlm_loss
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
        t0 = time.process_time()
        loss = self.fn(self.student, self.teacher, self.batch, self.weights, self.plans[k], self.pairs[k])
        if mem is not None:
            mem.sample()
        loss.backward()
        if mem is not None:
            mem.sample()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.process_time() - t0


def timed_round(runners, pairs, steps: int) -> dict[str, float]:
    """One round: median CPU s/step per method, the methods interleaved step by step (order rotated)."""
    times = {m: [] for m in runners}
    names = list(runners)
    for i in range(steps + 1):
        k = i % len(pairs)
        for m in names[i % 3:] + names[: i % 3]:
            dt = runners[m].step(k)
            if i:  # the first step of a round warms up
                times[m].append(dt)
    return {m: statistics.median(t) for m, t in times.items()}


def measure(student, teacher, batch, plans, pairs, steps: int, repeats: int):
    """Per round: median s/step of each method; and mean peak bytes per method (untimed steps)."""
    runners = {m: Runner(m, student, teacher, batch, plans, pairs) for m in METHODS}
    rounds = [timed_round(runners, pairs, steps) for _ in range(repeats)]
    peaks = {m: [] for m in METHODS}
    for m, runner in runners.items():
        for k in range(len(pairs)):  # memory: one untimed step per aligned pair
            with PeakMemory(runner.student, teacher) as mem:
                runner.step(k, mem)
            peaks[m].append(mem.delta)
    return rounds, {m: statistics.mean(p) for m, p in peaks.items()}


def spread(values) -> tuple[float, float]:
    """(median, half the range) of per-round figures."""
    return statistics.median(values), (max(values) - min(values)) / 2


# -- TED stage 2: the one trainer against a hand-written loop of the same step ------------------------
def ted_setup(width: int, vocab: int, seq: int, batch: int, seed: int = 0):
    from applications.distill.ted import stages as tt

    torch.manual_seed(seed)

    def bert(layers, hidden):
        return tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=4 * hidden, max_position_embeddings=max(64, seq), num_labels=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    teacher, student = bert(6, width), bert(3, width)
    g = torch.Generator().manual_seed(seed + 1)
    n = batch * 64
    ids = torch.randint(5, vocab, (n, seq), generator=g).tolist()
    data = tt.TaskData(ids, torch.randint(0, 2, (n,), generator=g).tolist(), 0, "classification")
    t_f = tt.TEDFilters([1, 3, 5], width, width, "linear", "classification", 2)
    s_f = tt.TEDFilters([0, 1, 2], width, width, "linear", "classification", 2)
    return teacher, student, data, t_f, s_f


def ted_loop_step_times(teacher, student, data, t_f, s_f, batch: int, steps: int) -> list[float]:
    """The hand-written stage-2 loop (AdamW, LambdaLR warmup/decay, clipping), CPU s per step."""
    from applications.distill.objectives.ted import TEDConfig, stage2_loss
    from applications.distill.ted import stages as tt

    config = TEDConfig(mode="ted")
    teacher.eval().requires_grad_(False)
    t_f.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    params = list(student.parameters()) + list(s_f.filters.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / 2, 1.0))
    collate = data.collator()
    times = []
    for i in range(steps + 1):
        t0 = time.process_time()
        rows = [(i * batch + r) % len(data) for r in range(batch)]
        b = collate([data[r] for r in rows])
        x = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.no_grad():
            t_logits, t_states = tt.forward_states(teacher, x, t_f.layers)
        s_logits, s_states = tt.forward_states(student, x, s_f.layers)
        loss, parts = stage2_loss(config, student_logits=s_logits, teacher_logits=t_logits, labels=b["labels"],
                                  task="classification", student_states=s_states, teacher_states=t_states,
                                  mask=x["attention_mask"], student_filters=s_f, teacher_filters=t_f)
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss")
        parts = {k: float(v) for k, v in parts.items()}  # the old loop read every part each step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if i:
            times.append(time.process_time() - t0)
    return times


class _StepTimer(tf.TrainerCallback):
    """CPU time from one step's end to the next's: everything the trainer does per step (fetching and
    collating the batch, moving it, the step, its bookkeeping)."""

    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_end(self, args, state, control, **kw):
        now = time.process_time()
        if self.t0 is not None:
            self.times.append(now - self.t0)
        self.t0 = now


def ted_trainer_step_times(teacher, student, data, t_f, s_f, batch: int, steps: int) -> list[float]:
    """The same step through ted.stages.stage2 (DistillTrainer), CPU s per step (the first step warms up)."""
    from applications.distill.objectives.ted import TEDConfig
    from applications.distill.ted import stages as tt

    timer = _StepTimer()
    opts = tt.LoopOptions(steps=steps + 2, batch_size=batch, learning_rate=1e-4, logging_steps=10 ** 6)
    tt.stage2(TEDConfig(mode="ted"), teacher, student, data, opts, t_f, s_f, callbacks=[timer])
    return timer.times


def measure_ted(width: int, vocab: int, seq: int, batch: int, steps: int, repeats: int) -> list[float]:
    """Per round: trainer s/step / loop s/step (medians), the two interleaved round by round."""
    ratios = []
    for r in range(repeats):
        teacher, student, data, t_f, s_f = ted_setup(width, vocab, seq, batch)
        order = [ted_loop_step_times, ted_trainer_step_times][:: 1 if r % 2 == 0 else -1]
        got = {}
        for fn in order:
            got[fn.__name__] = statistics.median(fn(teacher, student, data, t_f, s_f, batch, steps))
        ratios.append((got["ted_trainer_step_times"], got["ted_loop_step_times"]))
    return ratios


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
    parser.add_argument("--repeats", type=int, default=None, help="independent timed rounds (default 3; quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seq = args.seq or (32 if args.quick else 64)
    batch = args.batch or (8 if args.quick else 16)
    steps = args.steps or (3 if args.quick else 9)
    repeats = args.repeats or (2 if args.quick else 3)
    teacher, student, data, plans, pairs = build(args.width, args.vocab, seq, batch)
    diff = check_same_loss(student, teacher, data, plans, pairs)
    print(f"config: teacher 6 layers, student 3 layers, width {args.width}, vocab {args.vocab}, batch {batch}x{seq}, "
          f"FULL alignment pairs {pairs}; threads {torch.get_num_threads()}")
    print(f"loss check (dropout off): |ours - naive| = {diff:.2e} <= 1e-5")
    rounds, peaks = measure(student, teacher, data, plans, pairs, steps, repeats)
    floor = work_floor(args.width, args.vocab, seq, pairs)
    print(f"{'method':10s} {'CPU s/step':>10s} {'peak MiB':>9s}   ({repeats} rounds of {steps} steps, median)")
    for m in METHODS:
        print(f"{m:10s} {statistics.median(r[m] for r in rounds):10.4f} {peaks[m] / 2 ** 20:9.1f}")
    t_ratio, t_spread = spread([r["diito"] / r["standard"] for r in rounds])
    n_ratio, n_spread = spread([r["naive"] / r["diito"] for r in rounds])
    ted = measure_ted(args.width, args.vocab, seq, batch, steps, repeats)
    ted_ratio, ted_spread = spread([a / b for a, b in ted])
    print(f"{'ted loop':10s} {statistics.median(b for _, b in ted):10.4f}")
    print(f"{'ted trainer':10s} {statistics.median(a for a, _ in ted):10.4f}")
    out = {"time_ratio": round(t_ratio, 3), "time_ratio_spread": round(t_spread, 3),
           "memory_ratio": round(peaks["diito"] / max(peaks["standard"], 1), 3),
           "naive_time_ratio": round(n_ratio, 3), "naive_time_ratio_spread": round(n_spread, 3),
           "naive_memory_ratio": round(peaks["naive"] / max(peaks["diito"], 1), 3),
           "ted_trainer_vs_loop_time": round(ted_ratio, 3), "ted_trainer_vs_loop_spread": round(ted_spread, 3),
           "floor_time_ratio": round(floor["time_diito_vs_standard"], 3),
           "floor_memory_ratio": round(floor["memory_diito_vs_standard"], 3),
           "floor_naive_time_ratio": round(floor["time_naive_vs_diito"], 3)}
    print(f"DIITO / standard time   {out['time_ratio']:.2f} ± {t_spread:.2f}  (target <= 1.6; work floor "
          f"{out['floor_time_ratio']:.2f})")
    print(f"DIITO / standard memory {out['memory_ratio']:.2f}  (target <= 1.6; activation floor "
          f"{out['floor_memory_ratio']:.2f})")
    print(f"naive / DIITO time      {out['naive_time_ratio']:.2f} ± {n_spread:.2f}  (target >= 1.75; work floor "
          f"{out['floor_naive_time_ratio']:.2f})")
    print(f"TED stage 2: trainer / hand loop time {ted_ratio:.2f} ± {ted_spread:.2f}  (target <= 1.0)")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
