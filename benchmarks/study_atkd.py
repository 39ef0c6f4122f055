"""Study: does ATKD beat plain KD when its premise holds (an over-confident teacher)? Resumable, multi-seed.

ATKD (Zhong et al., ACL 2024) rests on KL(p‖q) = TKD + UNC · DKD with UNC = 1 − p_g: where the
teacher is sure of the gold token (UNC → 0) the non-target "dark knowledge" term DKD is starved, so
ATKD drops the UNC weight and re-weights easy / hard tokens. This study measures that premise and
tests the method where it should pay off:

1. teachers (GPT-2 architecture, word-level WikiText-2): *today* (4 layers, width 128, 400 steps,
   the original setting), *sharp* (today's logits at temperature τ < 1), *memorised* (today's
   teacher trained much longer, without dropout, on a fixed subset of the training split, which is
   then its students' distillation set, as the paper's teachers are fine-tuned on the data their
   students are distilled on), and *synthetic* (the project's grammar corpus, `make_corpus`;
   clearly not real data). For each: its UNC distribution on the distillation tokens and held out;
2. KD vs ATKD students per teacher and seed, in lockstep (same init, same batches, same dropout
   masks per seed; one teacher forward feeds every student of a group);
3. a sweep of ATKD's λ and hard-token fraction on today's teacher;
4. the per-token diagnostic: the share of DKD in the KD loss, UNC · DKD / KL, on ATKD's hard vs
   easy tokens, for the student at initialisation and after training.

Every piece (data, each teacher, each UNC measurement, each group of students) is cached under
--work as a folder holding ``result.json`` (`benchmarks/studies.py`); a group of students also
checkpoints every `save_every` steps, so a killed study resumes where it stopped.

    python benchmarks/study_atkd.py --data ../shared/data/wikitext-2 --work /work/runs/study_atkd --report docs/results.md
    python benchmarks/study_atkd.py --smoke --work /tmp/a        # toy size on the synthetic corpus (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import torch.nn.functional as F

from applications.distill.objectives.atkd import ATKDConfig, atkd_objective, hard_mask, kd_decomposition
from benchmarks.studies import Busy, cached, mean_std, paired, write_section

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"
HEADING = "## ATKD vs KD on WikiText-2 (`benchmarks/study_atkd.py`)"
NAME = "study_atkd"
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
BINS = 50


@dataclass(frozen=True)
class Size:
    """Every budget knob of the study (the same for every method of a teacher)."""

    vocab: int = 3000
    length: int = 64
    batch: int = 16
    width: int = 128
    teacher_layers: int = 4
    teacher_steps: int = 400
    teacher_lr: float = 2e-3
    memorise_blocks: int = 128  # the memorised teacher's (and its students') training subset
    memorise_steps: int = 600  # further steps of today's teacher on that subset, no dropout
    memorise_lr: float = 2e-3
    sharpen: float = 0.5  # the sharp teacher's temperature
    student_layers: int = 2
    student_steps: int = 200
    student_lr: float = 2e-3
    eval_blocks: int = 300
    unc_blocks: int = 300  # distillation blocks the UNC distribution is measured on
    diag_blocks: int = 32  # distillation blocks of the DKD-share diagnostic
    save_every: int = 50
    synth_sentences: int = 6000
    synth_eval_sentences: int = 600
    synth_teacher_steps: int = 400


SMOKE = Size(vocab=200, length=16, batch=4, width=32, teacher_layers=2, teacher_steps=6, memorise_blocks=8,
             memorise_steps=6, student_steps=4, eval_blocks=8, unc_blocks=8, diag_blocks=4, save_every=2,
             synth_sentences=300, synth_eval_sentences=60, synth_teacher_steps=6)

#: Teacher view -> (network, temperature attribute or 1, distillation data, held-out data).
VIEWS = {
    "today": ("today", None, "train", "valid"),
    "sharp": ("today", "sharpen", "train", "valid"),
    "memorised": ("memorised", None, "memorise", "valid"),
    "synthetic": ("synthetic", None, "synth_train", "synth_valid"),
}
LABELS = {"today": "today's (4 layers, 400 steps)", "sharp": "today's, sharpened (τ = {tau})",
          "memorised": "memorised (today's + {m} steps on a {b}-block subset, no dropout)",
          "synthetic": "**synthetic** grammar corpus (not real data)"}
#: Method -> ATKD config (None: plain KD).
DEFAULT = ATKDConfig()
METHODS = {"kd": None, "atkd": DEFAULT,
           "atkd-lam0.1": replace(DEFAULT, lam=0.1), "atkd-lam0.5": replace(DEFAULT, lam=0.5),
           "atkd-hard0.25": replace(DEFAULT, hard_fraction=0.25), "atkd-hard0.75": replace(DEFAULT, hard_fraction=0.75)}
SWEEP = ("atkd-lam0.1", "atkd-lam0.5", "atkd-hard0.25", "atkd-hard0.75")
#: Group kind -> (network, [(view, method)]): students that share a teacher forward and batches.
GROUPS = {
    "today": ("today", [("today", "kd"), ("today", "atkd")]),
    "sharp": ("today", [("sharp", "kd"), ("sharp", "atkd")]),
    "memorised": ("memorised", [("memorised", "kd"), ("memorised", "atkd")]),
    "sweep": ("today", [("today", m) for m in SWEEP]),
    "synthetic": ("synthetic", [("synthetic", "kd"), ("synthetic", "atkd")]),
}


# -- models and training (the original study's recipe) ---------------------------------------------
def tokenizer_for(lines: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=vocab_size,
                                                            special_tokens=["<pad>", "<eos>", "<unk>"]))
    return tok


def blocks(tok, lines: list[str], length: int) -> torch.Tensor:
    """The text as one token stream (a <eos> after each line), cut into [n, length] blocks."""
    eos = tok.token_to_id("<eos>")
    ids = []
    for line in lines:
        if line.strip():
            ids.extend(tok.encode(line.strip()).ids + [eos])
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def gpt(vocab: int, layers: int, width: int, length: int, seed: int, dropout: float = 0.1):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=width, n_layer=layers, n_head=4,
                        n_inner=4 * width, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=1, eos_token_id=1, use_cache=False)
    return tf.GPT2LMHeadModel(cfg)


def schedule(opt, steps: int):
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))


def order(n: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """The same seeded sequence of batch indices for every method of a seed."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.randperm(n, generator=g) for _ in range(steps * batch // n + 1)])
    return [idx[i * batch:(i + 1) * batch] for i in range(steps)]


def clm(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def perplexity(model, data: torch.Tensor, temperature: float = 1.0, batch: int = 32) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(data), batch):
        ids = data[i:i + batch]
        total += float(clm(model(input_ids=ids).logits / temperature, ids)) * ids.shape[0]
    return math.exp(total / len(data))


def fit(model, data, steps, batch, lr, seed):
    """Causal-LM training (AdamW, 5% warmup, linear decay, clip 1)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = schedule(opt, steps)
    model.train()
    for idx in order(len(data), steps, batch, seed):
        ids = data[idx]
        loss = clm(model(input_ids=ids).logits, ids)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return float(loss.detach())


def kd_loss(s_logits, t_logits, ids):
    """Forward KL(teacher ‖ student) per next-token position, τ = 1, mean over tokens."""
    s = F.log_softmax(s_logits[:, :-1].float(), -1)
    t = F.log_softmax(t_logits[:, :-1].float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def loss_of(method: str):
    config = METHODS[method]
    if config is None:
        return kd_loss
    return lambda s, t, ids: atkd_objective(s, t, ids, causal=True, config=config, check=False)[0]


# -- the diagnostic ------------------------------------------------------------------------------------
def dkd_share(teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor,
              hard_fraction: float = 0.5) -> dict:
    """The share of DKD in the KD loss, UNC · DKD / KL, on ATKD's hard and easy tokens (and all).

    Logits [n, vocab] at positions whose next token is `targets` [n]; hard = the `hard_fraction` of
    positions with the highest teacher UNC = 1 − p_g. Per group: ``share`` = Σ UNC·DKD / Σ KL (the
    share of the group's KD loss), ``median_share`` (per token), the mean UNC and mean KL.
    """
    _tkd, dkd, unc = kd_decomposition(teacher_logits, student_logits, targets)
    log_p, log_q = F.log_softmax(teacher_logits.double(), -1), F.log_softmax(student_logits.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    weighted = (unc * dkd).double()
    hard = hard_mask(unc, torch.ones_like(unc, dtype=torch.bool), hard_fraction)
    out = {}
    for name, m in (("hard", hard), ("easy", ~hard), ("all", torch.ones_like(hard))):
        out[name] = {"share": float(weighted[m].sum() / kl[m].sum()),
                     "median_share": float((weighted[m] / kl[m].clamp(min=1e-12)).median()),
                     "unc": float(unc[m].mean()), "kl": float(kl[m].mean()), "tokens": int(m.sum())}
    return out


def flat_positions(logits: torch.Tensor, ids: torch.Tensor):
    """[n, vocab] logits of the next-token positions and their targets [n]."""
    return logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)


@torch.no_grad()
def diagnose(student, teacher_logits: torch.Tensor, ids: torch.Tensor) -> dict:
    student.eval()
    s, targets = flat_positions(student(input_ids=ids).logits, ids)
    t, _ = flat_positions(teacher_logits, ids)
    return dkd_share(t, s, targets, DEFAULT.hard_fraction)


# -- pieces ---------------------------------------------------------------------------------------------
def prepare_data(work: Path, data: Path, size: Size, smoke: bool) -> dict:
    """Token blocks of every split (WikiText-2 and the synthetic corpus), cached under work/data."""
    from applications.distill.corpus import make_corpus

    def compute(folder: Path) -> dict:
        if smoke:  # a stand-in for WikiText: the grammar corpus under another seed
            train_lines, valid_lines = make_corpus(400, seed=10), make_corpus(80, seed=11)
        else:
            train_lines = (data / "test.txt").read_text(encoding="utf-8").splitlines()
            valid_lines = (data / "valid.txt").read_text(encoding="utf-8").splitlines()
        tok = tokenizer_for(train_lines, size.vocab)
        vocab = max(tok.get_vocab().values()) + 1  # ids can skip one when a special token is also a word
        train = blocks(tok, train_lines, size.length)
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(4321))
        synth = make_corpus(size.synth_sentences + size.synth_eval_sentences, seed=0)
        stok = tokenizer_for(synth[: size.synth_sentences], size.vocab)
        splits = {"train": train, "valid": blocks(tok, valid_lines, size.length)[: size.eval_blocks],
                  "memorise": train[pick[: size.memorise_blocks]],
                  "synth_train": blocks(stok, synth[: size.synth_sentences], size.length),
                  "synth_valid": blocks(stok, synth[size.synth_sentences:], size.length)[: size.eval_blocks]}
        torch.save(splits, folder / "blocks.pt")
        return {"vocab": vocab, "synth_vocab": max(stok.get_vocab().values()) + 1,
                "blocks": {k: list(v.shape) for k, v in splits.items()},
                "train_words": sum(len(x.split()) for x in train_lines)}

    return cached(work / "data", compute)[0]


def splits_of(work: Path, size: Size) -> dict[str, torch.Tensor]:
    splits = torch.load(work / "data" / "blocks.pt")
    splits["memorise"] = splits["memorise"][: size.memorise_blocks]  # a prefix of one seeded permutation
    return splits


def vocab_of(info: dict, network: str) -> int:
    return info["synth_vocab"] if network == "synthetic" else info["vocab"]


def load_teacher(work: Path, info: dict, size: Size, network: str):
    model = gpt(vocab_of(info, network), size.teacher_layers, size.width, size.length, 1234)
    model.load_state_dict(torch.load(work / f"teacher-{network}" / "model.pt"))
    return model.eval().requires_grad_(False)


def build_teachers(work: Path, info: dict, size: Size, networks, log) -> dict:
    splits = splits_of(work, size)
    out = {}
    for network in networks:
        def compute(folder: Path, network=network) -> dict:
            start = time.time()
            if network == "memorised":
                model = load_teacher(work, info, size, "today")
                for m in model.modules():  # no dropout: let it become sure of its training tokens
                    if isinstance(m, torch.nn.Dropout):
                        m.p = 0.0
                loss = fit(model.requires_grad_(True), splits["memorise"], size.memorise_steps, size.batch,
                           size.memorise_lr, 1235)
            else:
                data = splits["synth_train" if network == "synthetic" else "train"]
                model = gpt(vocab_of(info, network), size.teacher_layers, size.width, size.length, 1234)
                loss = fit(model, data, size.synth_teacher_steps if network == "synthetic" else size.teacher_steps,
                           size.batch, size.teacher_lr, 1234)
            torch.save(model.state_dict(), folder / "model.pt")
            held = splits["synth_valid" if network == "synthetic" else "valid"]
            return {"network": network, "final_train_loss": loss, "perplexity": perplexity(model, held),
                    "train_seconds": round(time.time() - start, 1)}

        out[network], reused = cached(work / f"teacher-{network}", compute)
        if not reused:
            log(f"teacher {network}: held-out perplexity {out[network]['perplexity']:.2f} "
                f"({out[network]['train_seconds']:.0f}s)")
    return out


def temperature_of(view: str, size: Size) -> float:
    attr = VIEWS[view][1]
    return getattr(size, attr) if attr else 1.0


@torch.no_grad()
def teacher_logits(teacher, ids: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([teacher(input_ids=ids[i:i + batch]).logits.float() for i in range(0, len(ids), batch)])


def unc_summary(unc: torch.Tensor) -> dict:
    q = torch.quantile(unc.double(), torch.tensor(QUANTILES, dtype=torch.double))
    counts = torch.histc(unc.double(), bins=BINS, min=0.0, max=1.0)
    return {"quantiles": dict(zip([f"{int(x * 100)}" for x in QUANTILES], q.tolist())), "mean": float(unc.mean()),
            "below_0.1": float((unc < 0.1).double().mean()), "above_0.9": float((unc > 0.9).double().mean()),
            "histogram": counts.tolist(), "tokens": int(unc.numel())}


def measure_unc(work: Path, info: dict, size: Size, view: str, log) -> dict:
    """The teacher view's UNC = 1 − p_g on its distillation tokens and held out; its held-out perplexity."""
    network, _, train_split, held_split = VIEWS[view]

    def compute(folder: Path) -> dict:
        splits, tau = splits_of(work, size), temperature_of(view, size)
        teacher = load_teacher(work, info, size, network)
        out = {"view": view, "temperature": tau}
        train = splits[train_split]
        sample = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(4321))[: size.unc_blocks]]
        for name, ids in (("distill", sample), ("held_out", splits[held_split])):
            logits, targets = flat_positions(teacher_logits(teacher, ids) / tau, ids)
            log_p = F.log_softmax(logits, -1)
            unc = 1.0 - log_p.gather(-1, targets[:, None]).squeeze(-1).exp()
            entropy = -(log_p.exp() * log_p).sum(-1)
            out[name] = {**unc_summary(unc), "perplexity": math.exp(float(-log_p.gather(-1, targets[:, None]).mean())),
                         "entropy_mean": float(entropy.mean()),
                         "top1_accuracy": float((logits.argmax(-1) == targets).double().mean())}
        return out

    result, reused = cached(work / f"unc-{view}", compute)
    if not reused:
        log(f"UNC {view}: median {result['distill']['quantiles']['50']:.3f} on distillation tokens, "
            f"{result['held_out']['quantiles']['50']:.3f} held out")
    return result


def train_group(work: Path, info: dict, size: Size, kind: str, seed: int, stop_at: int | None = None) -> dict:
    """Train a group's students in lockstep from one teacher forward per batch; checkpoint; evaluate.

    Each student of a seed gets the same init and the same batches, and its own copy of the torch RNG
    state (dropout), so it trains exactly as it would alone. `stop_at` (tests) stops after saving the
    checkpoint of that step, like a killed run."""
    network, members = GROUPS[kind]
    folder = work / "groups" / f"{kind}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    splits = splits_of(work, size)
    teacher = load_teacher(work, info, size, network)
    data = splits[VIEWS[members[0][0]][2]]
    assert all(VIEWS[v][2] == VIEWS[members[0][0]][2] for v, _ in members), "a group shares its data"
    held = splits[VIEWS[members[0][0]][3]]
    diag_ids = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(999))[: size.diag_blocks]]
    diag_teacher = teacher_logits(teacher, diag_ids)
    vocab = vocab_of(info, network)
    students, opts, scheds, rngs, init_diag = [], [], [], [], {}
    for view, method in members:
        student = gpt(vocab, size.student_layers, size.width, size.length, seed)
        key = f"{view}:{method}"
        init_diag[key] = diagnose(student, diag_teacher / temperature_of(view, size), diag_ids)
        rngs.append(torch.get_rng_state())  # after the seeded init: the same for every student of the seed
        opt = torch.optim.AdamW(student.parameters(), lr=size.student_lr, weight_decay=0.01)
        students.append(student)
        opts.append(opt)
        scheds.append(schedule(opt, size.student_steps))
    state_file, first, seconds, losses = folder / "state.pt", 0, [0.0] * len(members), [float("nan")] * len(members)
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        first, seconds, losses, rngs = state["step"], state["seconds"], state["losses"], state["rngs"]
        for i in range(len(members)):
            students[i].load_state_dict(state["students"][i])
            opts[i].load_state_dict(state["opts"][i])
            scheds[i].load_state_dict(state["scheds"][i])
    batches = order(len(data), size.student_steps, size.batch, seed)
    fns = [loss_of(method) for _, method in members]
    taus = [temperature_of(view, size) for view, _ in members]
    teacher_seconds = 0.0
    for step in range(first, size.student_steps):
        ids = data[batches[step]]
        t0 = time.time()
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits.float()
        teacher_seconds += time.time() - t0
        for i, student in enumerate(students):
            t0 = time.time()
            torch.set_rng_state(rngs[i])
            student.train()
            loss = fns[i](student(input_ids=ids).logits, t_logits / taus[i], ids)
            opts[i].zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opts[i].step()
            scheds[i].step()
            rngs[i] = torch.get_rng_state()
            losses[i] = float(loss.detach())
            seconds[i] += time.time() - t0
        done = step + 1
        if done % size.save_every == 0 and done < size.student_steps or done == stop_at:
            tmp = folder / "state.pt.tmp"
            torch.save({"step": done, "seconds": seconds, "losses": losses, "rngs": rngs,
                        "students": [s.state_dict() for s in students], "opts": [o.state_dict() for o in opts],
                        "scheds": [s.state_dict() for s in scheds]}, tmp)
            tmp.replace(state_file)
            if done == stop_at:
                raise Stopped(f"{kind}-s{seed} stopped at step {done}")
    result = {"kind": kind, "seed": seed, "steps": size.student_steps, "resumed_from": first,
              "teacher_forward_seconds": round(teacher_seconds, 1), "students": {}}
    for i, (view, method) in enumerate(members):
        key = f"{view}:{method}"
        result["students"][key] = {
            "view": view, "method": method, "seed": seed, "perplexity": perplexity(students[i], held),
            "final_loss": losses[i], "train_seconds": round(seconds[i], 1),
            "diag_init": init_diag[key], "diag_end": diagnose(students[i], diag_teacher / taus[i], diag_ids)}
    state_file.unlink(missing_ok=True)
    return result


class Stopped(Exception):
    """A group stopped on purpose after checkpointing (tests of resuming)."""


# -- the study ------------------------------------------------------------------------------------------
def plan(seeds, sweep_seeds, synth_seeds, sharp_seeds, kinds=tuple(GROUPS)) -> list[tuple[str, int]]:
    """The groups in the order they run: the core comparison first, so a partial study answers most."""
    out = [(kind, s) for s in seeds for kind in ("today", "memorised")]
    out += [("synthetic", s) for s in synth_seeds[:1]] + [("sweep", s) for s in sweep_seeds]
    out += [("sharp", s) for s in sharp_seeds] + [("synthetic", s) for s in synth_seeds[1:]]
    return [(k, s) for k, s in out if k in kinds]


def collect(work: Path) -> dict:
    """(view, method) -> seed -> student result, over every finished group (whichever group trained it)."""
    runs = {}
    for done in sorted((work / "groups").glob("*/result.json")):
        group = json.loads(done.read_text())
        for r in group["students"].values():
            runs.setdefault((r["view"], r["method"]), {}).setdefault(group["seed"], r)
    return runs


def covered(runs: dict, kind: str, seed: int) -> bool:
    """Whether every student of the group already finished (in this group or in another one)."""
    return all(seed in runs.get(member, {}) for member in GROUPS[kind][1])


def fmt_q(s: dict) -> str:
    q = s["quantiles"]
    return " | ".join(f"{q[k]:.3f}" for k in ("10", "25", "50", "75", "90")) + \
        f" | {s['mean']:.3f} | {100 * s['below_0.1']:.1f} % | {100 * s['above_0.9']:.1f} %"


def label(view: str, size: Size) -> str:
    return LABELS[view].format(tau=size.sharpen, m=size.memorise_steps, b=size.memorise_blocks)


def unc_table(uncs: dict, size: Size) -> str:
    lines = [("| teacher | tokens | perplexity | top-1 acc. | entropy (nats) | UNC 10 % | 25 % | 50 % | 75 % | 90 % "
             "| mean | UNC < 0.1 | UNC > 0.9 |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for view, u in uncs.items():
        for part, name in (("distill", "distillation"), ("held_out", "held out")):
            s = u[part]
            lines.append(f"| {label(view, size)} | {name} ({s['tokens']:,}) | {s['perplexity']:.2f} "
                         f"| {s['top1_accuracy']:.3f} | {s['entropy_mean']:.2f} | {fmt_q(s)} |")
    return "\n".join(lines)


def vals(runs: dict) -> list[float]:
    return [r["perplexity"] for _, r in sorted(runs.items())]


def per_seed_text(runs: dict) -> str:
    return ", ".join(f"{r['perplexity']:.2f}" for _, r in sorted(runs.items())) or "—"


def comparison_table(runs: dict, size: Size, seeds) -> str:
    lines = ["| teacher | seeds | KD: per seed | KD | ATKD: per seed | ATKD | Δ ATKD − KD, paired (per seed) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for view in VIEWS:
        kd, at = runs.get((view, "kd"), {}), runs.get((view, "atkd"), {})
        if not kd and not at:
            continue
        d = paired(at, kd, "perplexity")
        lines.append(f"| {label(view, size)} | {len(d)} | {per_seed_text(kd)} | {mean_std(vals(kd))} "
                     f"| {per_seed_text(at)} | {mean_std(vals(at))} | {mean_std(d, '+.2f')} "
                     f"({', '.join(f'{x:+.2f}' for x in d)}) |")
    return "\n".join(lines)


def sweep_table(runs: dict) -> str:
    kd, at = runs.get(("today", "kd"), {}), runs.get(("today", "atkd"), {})
    lines = [("| ATKD on today's teacher | λ | hard fraction | seeds | perplexity: per seed | mean ± std "
             "| Δ vs KD, paired | Δ vs ATKD (λ 0.2, 0.5), paired |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in ("kd", "atkd") + SWEEP:
        r = runs.get(("today", method), {})
        c = METHODS[method]
        lines.append(f"| {method} | {c.lam if c else '—'} | {c.hard_fraction if c else '—'} | {len(r)} "
                     f"| {per_seed_text(r)} | {mean_std(vals(r))} "
                     f"| {'—' if method == 'kd' else mean_std(paired(r, kd, 'perplexity'), '+.2f')} "
                     f"| {'—' if method in ('kd', 'atkd') else mean_std(paired(r, at, 'perplexity'), '+.2f')} |")
    return "\n".join(lines)


def diag_table(runs: dict, size: Size) -> str:
    lines = [("| teacher | student | seeds | hard: UNC·DKD / KL | easy: UNC·DKD / KL | all | hard: median per token "
             "| easy: median per token | hard: mean UNC | easy: mean UNC | hard: mean KL | easy: mean KL |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for view in VIEWS:
        for method, when, name in (("kd", "diag_init", "at initialisation"), ("kd", "diag_end", "after KD"),
                                   ("atkd", "diag_end", "after ATKD")):
            r = runs.get((view, method), {})
            if not r:
                continue
            ds = [x[when] for x in r.values()]

            def col(group, key, fmt=".3f", ds=ds):
                return mean_std([d[group][key] for d in ds], fmt).replace(" (1 seed)", "")

            lines.append(f"| {label(view, size)} | {name} | {len(ds)} | {col('hard', 'share')} | {col('easy', 'share')} "
                         f"| {col('all', 'share')} | {col('hard', 'median_share')} | {col('easy', 'median_share')} "
                         f"| {col('hard', 'unc')} | {col('easy', 'unc')} | {col('hard', 'kl', '.2f')} "
                         f"| {col('easy', 'kl', '.2f')} |")
    return "\n".join(lines)


def plot_unc(uncs: dict, size: Size, path: Path) -> Path | None:
    """Histograms of UNC = 1 − p_g per teacher view, on the distillation tokens and held out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not uncs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    edges = [i / BINS for i in range(BINS + 1)]
    colors = {"today": "#777", "sharp": "#c63", "memorised": "#36c", "synthetic": "#2a7"}
    for ax, part, title in ((axes[0], "distill", "tokens the students are distilled on"),
                            (axes[1], "held_out", "held-out tokens")):
        for view, u in uncs.items():
            counts = u[part]["histogram"]
            total = sum(counts) or 1
            ax.stairs([c / total for c in counts], edges, color=colors[view], lw=1.8,
                      ls="--" if view == "synthetic" else "-",
                      label=f"{label(view, size).replace('**', '')}: median {u[part]['quantiles']['50']:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("UNC = 1 − p_teacher(gold token)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", title="median UNC on these tokens", title_fontsize=7)
    axes[0].set_ylabel("share of tokens per bin (log)")
    fig.suptitle("Teacher uncertainty on the gold token (ATKD's premise: an over-confident teacher has UNC near 0)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timing(work: Path) -> dict:
    """Wall clock from the data's preparation to the newest finished piece; summed compute seconds."""
    pieces = list(work.glob("*/result.json")) + list(work.glob("groups/*/result.json"))
    first = (work / "data" / "result.json").stat().st_mtime
    last = max(p.stat().st_mtime for p in pieces)
    groups = [json.loads(p.read_text()) for p in work.glob("groups/*/result.json")]
    teachers = [json.loads(p.read_text()) for p in work.glob("teacher-*/result.json")]
    return {"wall_minutes": (last - first) / 60,
            "student_minutes": sum(s["train_seconds"] for g in groups for s in g["students"].values()) / 60,
            "teacher_forward_minutes": sum(g["teacher_forward_seconds"] for g in groups) / 60,
            "teacher_train_minutes": sum(t["train_seconds"] for t in teachers) / 60}


def generated(work, info, size, teachers, uncs, runs, groups, finished, png, command) -> str:
    clock = timing(work)
    lines = ["Regenerate (resumes from the cache in `--work`; finished pieces are reused):", "", "```", command, "```",
             "", (f"Hardware: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, torch "
             f"{torch.__version__}, {torch.get_num_threads()} torch thread(s). Wall clock from the first piece to the "
             f"last finished one: **{clock['wall_minutes']:.0f} min** (teacher training {clock['teacher_train_minutes']:.1f} "
             f"min, student steps summed {clock['student_minutes']:.1f} min, shared teacher forwards "
             f"{clock['teacher_forward_minutes']:.1f} min). Groups of students finished: {len(finished)}/{len(groups)}."), ""]
    if len(finished) < len(groups):
        missing = ", ".join(f"{k} seed {s}" for k, s in groups if (k, s) not in finished)
        lines += [f"**Partial study**: not finished: {missing}.", ""]
    b = info["blocks"]
    lines += [
        (f"Setup: `wikitext-2/test.txt` ({info['train_words']:,} words) to train on, the first {b['valid'][0]} blocks of "
        f"`valid.txt` held out; word-level tokenizer (vocabulary {info['vocab']:,}); blocks of {size.length} tokens "
        f"({b['train'][0]:,} training blocks). Teachers (GPT-2 architecture, {size.teacher_layers} layers, width "
        f"{size.width}): **today's** = the original study's recipe ({size.teacher_steps} steps, batch {size.batch}, "
        f"AdamW {size.teacher_lr}, dropout 0.1); **sharp** = today's logits / {size.sharpen}; **memorised** = today's "
        f"trained {size.memorise_steps} more steps (AdamW {size.memorise_lr}, no dropout) on a fixed "
        f"{size.memorise_blocks}-block subset of the training split, which is also its students' distillation set "
        f"(the paper's teachers are fine-tuned on the data their students are distilled on); **synthetic** = the "
        f"same architecture trained {size.synth_teacher_steps} steps on `make_corpus` ({size.synth_sentences:,} "
        f"sentences, vocabulary {info['synth_vocab']}), held out on {size.synth_eval_sentences} further sentences — "
        f"synthetic data, reported only as a third point. Students: {size.student_layers} layers, width {size.width}, "
        f"{size.student_steps} steps, batch {size.batch}, AdamW {size.student_lr}; per seed every student of a teacher "
        f"has the same init, batches and dropout masks (trained in lockstep from one teacher forward). **KD** = forward "
        f"KL(teacher ‖ student), τ = 1, mean over tokens; **ATKD** = `atkd_objective` over forward KL (λ = 0.2, 50 % "
        f"hard tokens, ranked per batch) unless stated. No ground-truth loss. Perplexity is held-out causal-LM "
        f"perplexity against the real next token (lower is better)."), "",
        ("**1. Teacher uncertainty.** UNC = 1 − p_g (gold token) of each teacher on a seeded random sample of "
         f"(at most) {size.unc_blocks} blocks of its distillation set and on the held-out blocks, with the teacher's "
         "own perplexity, top-1 accuracy and mean entropy on those tokens. The students' loss sees the same "
         "distributions (the sharp teacher's at τ)."), "", unc_table(uncs, size), ""]
    if png is not None:
        lines += [f"![UNC distribution per teacher]({png.name})", ""]
    tline = ", ".join(f"{k} {v['perplexity']:.2f}" for k, v in teachers.items())
    lines += [f"Teachers' held-out perplexity: {tline}.", "",
              "**2. KD vs ATKD**, same budget, paired by seed (Δ < 0: ATKD better).", "",
              comparison_table(runs, size, None), "",
              ("**3. ATKD's λ and hard-token fraction** on today's teacher (seeds as listed; the sweep runs after "
              "the core comparison)."), "", sweep_table(runs), "",
              (f"**4. The share of DKD in the KD loss**, UNC · DKD / KL (Σ over the group's tokens), on ATKD's hard "
              f"(top 50 % teacher UNC) and easy tokens of {size.diag_blocks} distillation blocks, mean ± std over "
              "seeds; the student at initialisation, after KD, after ATKD (the ATKD premise: on easy tokens the "
              "share is small, so KD barely teaches the non-target distribution there)."), "",
              diag_table(runs, size)]
    return "\n".join(lines)


def main(argv=None, log=print) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA), help="the wikitext-2 folder (test.txt, valid.txt)")
    ap.add_argument("--work", default="outputs/study_atkd", help="cache of every finished piece")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sweep-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--synthetic-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--sharp-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--kinds", nargs="+", choices=list(GROUPS), default=list(GROUPS),
                    help="only these groups (several processes can share one --work, e.g. one on the sweep)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="toy size on the synthetic corpus (seconds)")
    ap.add_argument("--report", help="results markdown to put the study's section in (e.g. docs/results.md)")
    ap.add_argument("--plot", help="UNC histogram PNG (default: study_atkd_unc.png next to --report)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from cached results")
    a = ap.parse_args(argv)
    size, data, work = (SMOKE if a.smoke else Size()), Path(a.data), Path(a.work)
    if not a.smoke and not (work / "data" / "result.json").is_file() and \
            not ((data / "test.txt").is_file() and (data / "valid.txt").is_file()):
        log(f"skipped: WikiText-2 not found at {data} (needs test.txt and valid.txt; see ../shared/data/README.md)")
        return {"skipped": True}
    if a.threads:
        torch.set_num_threads(a.threads)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "size.json"
    if saved.is_file() and json.loads(saved.read_text()) != asdict(size):
        log(f"error: {work} holds a study of another size ({saved}); use another --work or the same options")
        return {"error": "size mismatch"}
    saved.write_text(json.dumps(asdict(size), indent=2))
    start, ran, reused, busy = time.time(), [], [], []
    groups = plan(a.seeds, a.sweep_seeds, a.synthetic_seeds, a.sharp_seeds)
    mine = [(k, s) for k, s in groups if k in a.kinds]
    info = prepare_data(work, data, size, a.smoke)
    views = [v for v in VIEWS if any(v == m[0] for k, _ in groups for m in GROUPS[k][1])]
    networks = [n for n in ("today", "memorised", "synthetic") if any(VIEWS[v][0] == n for v in views)]
    teachers, uncs = {}, {}
    if not a.report_only:
        need = {VIEWS[m[0]][0] for k, _ in mine for m in GROUPS[k][1]}
        teachers = build_teachers(work, info, size, [n for n in networks if n in need | {"today"}], log)
        uncs = {v: measure_unc(work, info, size, v, log) for v in views if VIEWS[v][0] in need}
        for kind, seed in mine:
            name = f"{kind}-s{seed}"
            if covered(collect(work), kind, seed) and not (work / "groups" / name / "result.json").is_file():
                reused.append(name)  # its students were trained in another group (the lockstep makes them equal)
                continue
            try:
                group, was = cached(work / "groups" / name, lambda f, k=kind, s=seed: train_group(work, info, size, k, s))
            except Busy:
                busy.append(name)
                continue
            (reused if was else ran).append(name)
            if not was:
                log(f"{name}: " + ", ".join(f"{k} {r['perplexity']:.2f}" for k, r in group["students"].items()))
    for n in networks:
        if (work / f"teacher-{n}" / "result.json").is_file():
            teachers[n] = json.loads((work / f"teacher-{n}" / "result.json").read_text())
    for v in views:
        if (work / f"unc-{v}" / "result.json").is_file():
            uncs[v] = json.loads((work / f"unc-{v}" / "result.json").read_text())
    runs = collect(work)
    finished = {(k, s): True for k, s in groups if covered(runs, k, s)}
    result = {"teachers": teachers, "data": info, "ran": ran, "reused": reused, "busy": busy,
              "seconds": round(time.time() - start, 1),
              "runs": {f"{v}:{m}": r for (v, m), r in runs.items()}}
    (work / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    if a.report:
        png = Path(a.plot) if a.plot else Path(a.report).parent / "study_atkd_unc.png"
        png = plot_unc(uncs, size, png) or png
        shown = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--report-only"]
        command = "python benchmarks/study_atkd.py " + shlex.join(shown)
        text = generated(work, info, size, teachers, uncs, runs, groups, finished,
                         png if png.is_file() else None, command)
        write_section(Path(a.report), HEADING, text, NAME)
        result["plot"] = str(png)
    log(f"done in {result['seconds']:.0f}s: ran {len(ran)}, reused {len(reused)}, busy {len(busy)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
