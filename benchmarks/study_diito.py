"""Study: does causal distillation (DIITO) beat standard distillation? A small-scale reproduction.

One command, resumable: every finished piece (data, tokenizer + teacher, each student run, each
evaluation, each SST-2 fine-tune) is cached under --work as a directory holding ``result.json``;
a second invocation reuses them and only runs what is missing (an interrupted student resumes from
its last Trainer checkpoint). Students are trained and evaluated through the project's own CLI
(`applications.distill.cli`: the exact ``python -m applications.distill train|eval`` argument lists,
run in-process so the process pays the imports once); the teacher by `run.pretrain`.

Data: ../shared/data (wikitext-2 test.txt -> training sentences, valid.txt -> held-out sentences;
sst-2 train.tsv / dev.tsv). When it is absent the study prints why and exits (status 0). `--smoke`
builds a tiny synthetic corpus and SST-like tsv instead (seconds; used by tests/test_study_diito.py).

    python benchmarks/study_diito.py --report docs/results.md      # the study (~40 min, 2-core CPU)
    python benchmarks/study_diito.py --smoke --work /tmp/s         # toy size
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks import studies
from benchmarks.studies import Busy, Lock, markers, mean_std

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HEADING = "## Causal distillation (DIITO) study"

#: Variant name -> extra `train` flags (everything else is identical across variants).
VARIANTS = {
    "standard": ["--recipe", "standard"],
    "full": ["--recipe", "diito", "--alignment", "full"],
    "middle": ["--recipe", "diito", "--alignment", "middle"],
    "late": ["--recipe", "diito", "--alignment", "late"],
    "full_cos": ["--recipe", "full_cos", "--alignment", "full"],
    "full_random": ["--recipe", "diito", "--alignment", "full", "--span-mode", "random"],
    "full_masked": ["--recipe", "diito", "--alignment", "full", "--span-mode", "masked"],
    "standard_long": ["--recipe", "standard"],
}
#: The one exception to "same steps for all": a time-matched control, standard distillation given the
#: extra time a DIITO step takes (Size.matched_factor, 1.5x in docs/benchmarks.md), so a DIITO gain is
#: not just more compute per step.
MATCHED = "standard_long"
#: Variant -> the fewest student layers its alignment is defined for (LATE pairs the third- and second-to-last).
MIN_LAYERS = {"late": 3}


def steps_of(variant: str, size: Size) -> int:
    """A variant's training steps: student_steps, or matched_factor times that for the time-matched control."""
    return round((size.matched_factor if variant == MATCHED else 1) * size.student_steps)


def defined(variant: str, layers: int) -> bool:
    """Whether `variant` exists for a `layers`-layer student."""
    return layers >= MIN_LAYERS.get(variant, 1)


LABELS = {"standard": "standard (ce, mlm, cos 1/3)", "full": "DIITO FULL", "middle": "DIITO MIDDLE",
          "late": "DIITO LATE", "full_cos": "FULL + diito_cos", "full_random": "FULL, random positions",
          "full_masked": "FULL, masked positions",
          "standard_long": "standard, time-matched steps"}


@dataclass(frozen=True)
class Size:
    """Every budget knob of the study (identical for all variants, but for the MATCHED control's steps)."""

    vocab: int = 4000
    max_length: int = 64
    teacher_layers: int = 6
    hidden: int = 128
    heads: int = 4
    teacher_steps: int = 3000
    teacher_lr: float = 1e-3
    teacher_mlm_smoothing: float = 0.0  # BERT pre-trains with uniform masking; DistilBERT's count^-0.7 is for students
    student_steps: int = 200
    batch_size: int = 32
    eval_sentences: int = 500
    sst_train: int = 2000
    sst_steps: int = 189  # three epochs of sst_train at batch 32 (after one, the training loss is still ln 2)
    sst_lr: float = 5e-4
    save_steps: int = 100
    matched_factor: float = 1.5  # the time-matched control's steps / student_steps (DIITO / standard time per step)


SMOKE = Size(vocab=300, max_length=24, teacher_layers=4, hidden=32, heads=4, teacher_steps=6, student_steps=3,
             batch_size=8, eval_sentences=24, sst_train=40, sst_steps=3, save_steps=2)


# -- data ------------------------------------------------------------------------------------------
def sentences(text: str, min_words: int = 5) -> list[str]:
    """WikiText paragraphs split into sentences (at ' . '); headings and short fragments dropped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for s in re.split(r"(?<= \.) ", line):
            if len(s.split()) >= min_words:
                out.append(s.strip())
    return out


def prepare_data(work: Path, data: Path, size: Size, smoke: bool) -> dict:
    """train.txt / eval.txt / sst_train.tsv / sst_dev.tsv under work/data (cached)."""
    folder = work / "data"
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    if smoke:
        from applications.distill.corpus import make_corpus

        sents = make_corpus(240, seed=0)
        train, held = sents[:200], sents[200:200 + size.eval_sentences]
        rng = random.Random(0)
        sst = [f"{s}\t{int('dog' in s or 'cat' in s)}" for s in make_corpus(80, seed=1)]
        rng.shuffle(sst)
        sst_train, sst_dev = sst[: size.sst_train], sst[size.sst_train:]
    else:
        train = sentences((data / "wikitext-2" / "test.txt").read_text(encoding="utf-8"))
        held = sentences((data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8"))[: size.eval_sentences]
        lines = (data / "sst-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
        sst_train = random.Random(0).sample(lines, size.sst_train)  # a fixed seeded subset
        sst_dev = (data / "sst-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    (folder / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (folder / "eval.txt").write_text("\n".join(held) + "\n", encoding="utf-8")
    (folder / "sst_train.tsv").write_text("sentence\tlabel\n" + "\n".join(sst_train) + "\n", encoding="utf-8")
    (folder / "sst_dev.tsv").write_text("sentence\tlabel\n" + "\n".join(sst_dev) + "\n", encoding="utf-8")
    info = {"train_sentences": len(train), "eval_sentences": len(held), "sst_train": len(sst_train),
            "sst_dev": len(sst_dev), "train_words": sum(len(s.split()) for s in train)}
    done.write_text(json.dumps(info, indent=2))
    return info


# -- teacher ---------------------------------------------------------------------------------------
def build_teacher(work: Path, size: Size, log) -> dict:
    """WordPiece tokenizer (`tokenizers`) + BERT masked LM trained from scratch by `run.pretrain` (cached)."""
    out = work / "teacher"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    import transformers as tf

    from applications.distill.cli import build_parser, run_eval
    from applications.distill.config import DistillConfig
    from applications.distill.data import read_texts, train_tokenizer
    from applications.distill.run import pretrain

    start = time.time()
    texts = read_texts(str(work / "data" / "train.txt"))
    tokenizer = train_tokenizer(texts, size.vocab, causal=False)
    config = tf.BertConfig(vocab_size=len(tokenizer), hidden_size=size.hidden, num_hidden_layers=size.teacher_layers,
                           num_attention_heads=size.heads, intermediate_size=4 * size.hidden,
                           max_position_embeddings=max(64, size.max_length), pad_token_id=tokenizer.pad_token_id,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    import torch

    torch.manual_seed(1234)
    model = tf.BertForMaskedLM(config)
    cfg = DistillConfig(output_dir=str(out), max_steps=size.teacher_steps, learning_rate=size.teacher_lr,
                        batch_size=size.batch_size, max_length=size.max_length, save_steps=10 ** 9,
                        logging_steps=max(1, size.teacher_steps // 20), progress=False, plot=False, seed=1234,
                        mlm_smoothing=size.teacher_mlm_smoothing, overwrite_output_dir=True)  # a killed pretraining restarts
    pretrain(model, tokenizer, texts, cfg)
    seconds = time.time() - start
    ev = run_eval(build_parser().parse_args(
        ["eval", "--model", str(out), "--eval-file", str(work / "data" / "eval.txt"),
         "--max-length", str(size.max_length), "--batch-size", "32"]))
    result = {"perplexity": ev["perplexity"], "examples": ev["examples"], "vocab": len(tokenizer),
              "params": sum(p.numel() for p in model.parameters()), "train_seconds": round(seconds, 1),
              "seconds_per_step": seconds / size.teacher_steps}
    done.write_text(json.dumps(result, indent=2))
    log(f"teacher: perplexity {result['perplexity']:.2f} ({seconds:.0f}s)")
    return result


# -- students --------------------------------------------------------------------------------------
def train_argv(work: Path, size: Size, variant: str, layers: int, seed: int) -> list[str]:
    """The exact `python -m applications.distill train` arguments of one run."""
    out = work / "runs" / f"{variant}-L{layers}-s{seed}"
    return ["train", "--teacher", str(work / "teacher"), "--train-file", str(work / "data" / "train.txt"),
            "--output-dir", str(out), "--student-layers", str(layers), *VARIANTS[variant],
            "--max-steps", str(steps_of(variant, size)),
            "--batch-size", str(size.batch_size),
            "--max-length", str(size.max_length), "--seed", str(seed), "--save-steps", str(size.save_steps),
            "--logging-steps", str(max(1, size.student_steps // 20)), "--resume", "latest",
            "--no-progress", "--no-plot"]


def run_student(work: Path, size: Size, variant: str, layers: int, seed: int, log) -> tuple[dict, bool]:
    """Distil (CLI `train`), then evaluate (CLI `eval --teacher`, FULL alignment); cached. Returns (result, reused)."""
    argv = train_argv(work, size, variant, layers, seed)
    out = Path(argv[argv.index("--output-dir") + 1])
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text()), True
    with Lock(out.parent / f"{out.name}.lock"):
        return _run_student(work, size, (variant, layers, seed), argv, out, log), False


def _run_student(work: Path, size: Size, key: tuple, argv: list[str], out: Path, log) -> dict:
    from applications.distill.cli import build_parser, run_eval, run_train

    variant, layers, seed = key
    start, first = time.time(), _checkpoint_step(out)
    summary = run_train(build_parser().parse_args(argv))
    seconds = time.time() - start
    eval_argv = ["eval", "--model", str(out), "--eval-file", str(work / "data" / "eval.txt"),
                 "--teacher", str(work / "teacher"), "--alignment", "full", "--max-length", str(size.max_length),
                 "--batch-size", "32"]
    ev = run_eval(build_parser().parse_args(eval_argv))
    result = {"variant": variant, "layers": layers, "seed": seed, "perplexity": ev["perplexity"], "iia": ev["iia"],
              "iia_per_pair": ev["iia_per_pair"], "teacher_perplexity": ev["teacher_perplexity"],
              "steps": summary["global_step"], "train_seconds": round(seconds, 1),
              "seconds_per_step": _step_seconds(out, seconds, summary["global_step"] - first),
              "command": "python -m applications.distill " + shlex.join(argv),
              "eval_command": "python -m applications.distill " + shlex.join(eval_argv)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    log(f"{variant} L{layers} seed {seed}: ppl {result['perplexity']:.2f}, IIA {result['iia']:.3f}, "
        f"{result['seconds_per_step'] or float('nan'):.2f} s/step")
    return result


def _checkpoint_step(out: Path) -> int:
    """The step of the checkpoint a resumed run starts from (0 for a fresh run)."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    return int(last.rsplit("-", 1)[1]) if last else 0


def _step_seconds(out: Path, fallback: float, steps: int) -> float | None:
    """Seconds per step of this invocation: the Trainer's train_runtime (excludes setup) when logged, else wall
    time, over the steps it took. None when it took none (a killed run whose last checkpoint was its last step)."""
    from applications.distill.plot import read_log

    if steps <= 0:
        return None
    series = read_log(out / "log.csv") if (out / "log.csv").is_file() else {}
    runtime = series.get("train_runtime")
    seconds = runtime[-1][1] if runtime else fallback
    return seconds / steps


# -- SST-2 -----------------------------------------------------------------------------------------
def run_sst(work: Path, size: Size, model_dir: Path, log) -> tuple[dict, bool]:
    """Fine-tune a (student) masked LM's encoder on the fixed SST-2 subset; dev accuracy (cached)."""
    done = model_dir / "sst.json"
    if done.is_file():
        return json.loads(done.read_text()), True
    with Lock(model_dir.parent / f"{model_dir.name}.sst.lock"):
        return _run_sst(work, size, model_dir, done, log), False


def _run_sst(work, size, model_dir, done, log) -> dict:
    import torch
    import transformers as tf

    from applications.distill.ted import stages as tt

    start = time.time()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)  # the same classifier-head init and batches for every model
    tf.logging.set_verbosity_error()  # the new classifier head is expected; no load report
    model = tf.AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    model.config.architectures = [type(model).__name__]  # saved as a masked LM; now a classifier
    opts = tt.LoopOptions(steps=size.sst_steps, batch_size=size.batch_size, learning_rate=size.sst_lr,
                          max_length=size.max_length, seed=0)
    train = tt.task_data(str(work / "data" / "sst_train.tsv"), tokenizer, "classification", size.max_length, 2)
    dev = tt.task_data(str(work / "data" / "sst_dev.tsv"), tokenizer, "classification", size.max_length, 2)
    tt.finetune(model, train, opts)
    result = {"accuracy": tt.evaluate(model, dev)["accuracy"], "dev_examples": len(dev),
              "train_examples": len(train), "steps": size.sst_steps, "seconds": round(time.time() - start, 1)}
    done.write_text(json.dumps(result, indent=2))
    log(f"SST-2 {model_dir.name}: dev accuracy {result['accuracy']:.3f}")
    return result


# -- report ----------------------------------------------------------------------------------------
def collect(work: Path, variants, layer_list, seeds) -> dict:
    """Every cached result under work (whatever has finished), grouped by (variant, layers)."""
    rows = {}
    for layers in layer_list:
        for v in (v for v in variants if defined(v, layers)):
            runs = {}
            for s in seeds:
                d = work / "runs" / f"{v}-L{layers}-s{s}"
                if (d / "result.json").is_file():
                    r = json.loads((d / "result.json").read_text())
                    if (d / "sst.json").is_file():
                        r["sst"] = json.loads((d / "sst.json").read_text())["accuracy"]
                    runs[s] = r
            rows[(v, layers)] = runs
    return rows


def paired(rows: dict, variant: str, layers: int, key: str) -> list[float]:
    """variant minus standard, seed by seed (the seeds share data order, masks and initialisation)."""
    base, runs = rows.get(("standard", layers), {}), rows.get((variant, layers), {})
    return [runs[s][key] - base[s][key] for s in sorted(runs) if s in base and key in runs[s] and key in base[s]]


def table(rows: dict, seeds) -> str:
    header = ("| student | variant | seeds done | held-out MLM perplexity | Δ perplexity vs standard, paired | "
              "teacher-student IIA (FULL) | Δ IIA, paired | s / step | SST-2 dev accuracy |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (v, layers), runs in rows.items():
        done = sorted(runs)
        sst = [r["sst"] for r in runs.values() if "sst" in r]
        dppl = "—" if v == "standard" else mean_std(paired(rows, v, layers, "perplexity"), "+.2f")
        diia = "—" if v == "standard" else mean_std(paired(rows, v, layers, "iia"), "+.3f")
        lines.append(
            f"| {layers} layers | {LABELS[v]} | {len(done)}/{len(seeds)} "
            f"| {mean_std([r['perplexity'] for r in runs.values()], '.2f')} | {dppl} "
            f"| {mean_std([r['iia'] for r in runs.values()], '.3f')} | {diia} "
            f"| {mean_std([r['seconds_per_step'] for r in runs.values() if r['seconds_per_step']], '.2f')} "
            f"| {mean_std(sst, '.3f') + (f' ({len(sst)} seeds)' if 1 < len(sst) < len(done) else '')} |")
    return "\n".join(lines)


def per_seed(rows: dict) -> str:
    lines = ["| run | perplexity | IIA | SST-2 |", "| --- | --- | --- | --- |"]
    for (v, layers), runs in rows.items():
        for s, r in sorted(runs.items()):
            sst = f"{r['sst']:.3f}" if "sst" in r else "—"
            lines.append(f"| {v} L{layers} seed {s} | {r['perplexity']:.2f} | {r['iia']:.3f} | {sst} |")
    return "\n".join(lines)


def plot(rows: dict, teacher_ppl: float, path: Path) -> Path | None:
    """Perplexity and IIA per variant: mean ± std over seeds, and each seed as a small dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k, r) for k, r in rows.items() if r]
    if not items:
        return None
    depths = sorted({layers for (_, layers), _ in items}, reverse=True)
    fig, axes = plt.subplots(len(depths), 2, figsize=(12, 4.8 * len(depths)), squeeze=False)
    for row, depth in zip(axes, depths):
        mine = [(k, r) for k, r in items if k[1] == depth]
        names = [f"{LABELS[v]}\n(n={len(r)})" for (v, _), r in mine]
        for ax, key, title in ((row[0], "perplexity", "held-out MLM perplexity (lower is better)"),
                               (row[1], "iia", "teacher-student IIA, FULL alignment (higher is better)")):
            for x, (k, r) in enumerate(mine):
                vals = [run[key] for run in r.values()]
                color = "#777" if k[0].startswith("standard") else "#2a7"
                ax.scatter([x] * len(vals), vals, s=14, color=color, alpha=0.5, zorder=2)  # each seed
                ax.errorbar([x], [statistics.mean(vals)], yerr=[statistics.stdev(vals) if len(vals) > 1 else 0.0],
                            fmt="o", ms=8, capsize=5, color=color, zorder=3)  # mean ± std
            ax.set_xticks(range(len(mine)), names, rotation=45, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(mine) - 0.5)
            ax.set_title(f"{depth}-layer students: {title}\nmean ± std (large), each seed (small)", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        if teacher_ppl:
            row[0].axhline(teacher_ppl, color="k", ls="--", lw=1, label=f"teacher {teacher_ppl:.2f}")
            row[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


START, END = markers("study_diito")


def write_section(results_md: Path, generated: str, heading: str = HEADING, name: str = "study_diito") -> None:
    """Put `generated` into the study's section of results_md (the hand-written reading around it is kept)."""
    studies.write_section(results_md, heading, generated, name)


def unigram_perplexity(work: Path, max_length: int) -> float:
    """Reference: held-out perplexity of the training unigram distribution (add-one), teacher's tokenizer.

    A masked LM that ignores context cannot do much better than this; a teacher near it has not yet
    learned to use context (cached in work/unigram.json).
    """
    cache = work / "unigram.json"
    if cache.is_file():
        return json.loads(cache.read_text())["perplexity"]
    import transformers as tf

    from applications.distill.data import read_texts

    tok = tf.AutoTokenizer.from_pretrained(str(work / "teacher"))
    ppl = studies.unigram_perplexity(tok, read_texts(str(work / "data" / "train.txt")),
                                     read_texts(str(work / "data" / "eval.txt")), max_length)
    cache.write_text(json.dumps({"perplexity": ppl}))
    return ppl


def timing(work: Path) -> dict:
    """Wall clock from the data's preparation to the newest finished piece; summed training seconds."""
    pieces = list(work.rglob("result.json")) + list(work.rglob("sst.json"))
    first = (work / "data" / "result.json").stat().st_mtime
    last = max(p.stat().st_mtime for p in pieces)
    train = sum(json.loads(p.read_text()).get("train_seconds", 0) for p in (work / "runs").glob("*/result.json"))
    return {"wall_minutes": (last - first) / 60, "student_train_minutes": train / 60}


def generated_text(rows: dict, teacher: dict, info: dict, size: Size, seeds, png: Path | None, command: str,
                   work: Path) -> str:
    """The tables and facts the study regenerates (the reading around them is written by hand)."""
    import platform

    import torch

    clock = timing(work)
    expected = len(seeds) * len(rows)
    done = sum(len(r) for r in rows.values())
    missing = [f"{v} L{L} seed {s}" for (v, L), r in rows.items() for s in seeds if s not in r]
    no_sst = [f"{v} L{L} seed {s}" for (v, L), r in rows.items() for s, x in r.items() if "sst" not in x]
    lines = ["Regenerate (resumes from the cache in `--work`; finished runs are reused):", "", "```",
             command, "```", "",
             (f"Hardware: {platform.machine()} CPU, {__import__('os').cpu_count()} cores shared with other jobs, "
             f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s) per process. Wall clock from "
             f"the first piece to the last finished one: {clock['wall_minutes']:.0f} min (students' training alone: "
             f"{clock['student_train_minutes']:.0f} min summed over runs; several study processes may share the "
             f"cache, each taking the runs the others have not started). Runs finished: {done}/{expected}.")]
    if missing:
        lines += ["", f"**Partial study.** Missing distillation runs: {', '.join(missing)}."]
    if no_sst:
        lines += ["", f"Missing SST-2 fine-tunes: {', '.join(no_sst)}."]
    lines += ["", (f"Data: {info.get('train_sentences')} training sentences ({info.get('train_words')} words) "
              f"from WikiText-2 `test.txt`, the first {info.get('eval_sentences')} sentences of `valid.txt` held "
              f"out; SST-2: a fixed seeded subset of {info.get('sst_train')} training sentences, all "
              f"{info.get('sst_dev')} dev sentences."), "",
              (f"Teacher: BERT masked LM, {size.teacher_layers} layers, width {size.hidden}, {size.heads} heads, "
              f"WordPiece vocabulary {teacher.get('vocab')}, {teacher.get('params', 0) / 1e6:.2f} M parameters, "
              f"{size.teacher_steps} steps of batch {size.batch_size} (max length {size.max_length}), "
              f"{teacher.get('seconds_per_step', float('nan')):.2f} s/step. Held-out MLM perplexity "
              f"**{teacher.get('perplexity', float('nan')):.2f}** (reference: the training unigram distribution "
              f"scores {teacher.get('unigram', float('nan')):.2f} on the same held-out tokens)"
              + (f"; SST-2 dev accuracy {teacher['sst']:.3f}." if "sst" in teacher else ".")), "",
              ("Students: every variant, every seed: the same teacher, data, "
              f"{size.student_steps} steps, batch {size.batch_size}"
              + (f" (except {LABELS[MATCHED]}: {steps_of(MATCHED, size)} steps, {size.matched_factor}×)"
                 if any(k[0] == MATCHED for k in rows) else "")
              + f"; SST-2: {size.sst_steps} steps "
              f"(batch {size.batch_size}, lr {size.sst_lr}) from each student's weights, one fixed fine-tuning seed."),
              "", table(rows, seeds), ""]
    undefined = [f"{LABELS[v]} for {L}-layer students" for L in sorted({L for _, L in rows}, reverse=True)
                 for v in MIN_LAYERS if not defined(v, L)]
    if undefined:
        lines += [(f"Not defined, so not run: {', '.join(undefined)} (LATE pairs the third- and "
                   "second-to-last blocks)."), ""]
    if png is not None:
        lines += [f"![perplexity and IIA by variant]({png.name})", ""]
    lines += ["<details><summary>per seed</summary>", "", per_seed(rows), "", "</details>"]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------
def main(argv=None, log=print) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA), help="folder holding wikitext-2/ and sst-2/")
    ap.add_argument("--work", default="outputs/study_diito", help="cache of every finished piece (resumable)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--student-layers", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--no-sst", action="store_true", help="skip the SST-2 fine-tunes")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--smoke", action="store_true", help="toy size on a synthetic corpus (seconds)")
    ap.add_argument("--report", help="results markdown to put the study's section in (e.g. docs/results.md)")
    ap.add_argument("--plot", help="plot PNG (default: study_diito.png next to --report)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from cached results")
    for f in Size.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    a = ap.parse_args(argv)
    base = SMOKE if a.smoke else Size()
    size = Size(**{**asdict(base), **{k: getattr(a, k) for k in asdict(base) if getattr(a, k) is not None}})
    data, work = Path(a.data), Path(a.work)
    need = [data / "wikitext-2" / "test.txt", data / "wikitext-2" / "valid.txt", data / "sst-2" / "train.tsv",
            data / "sst-2" / "dev.tsv"]
    if not a.smoke and not (work / "data" / "result.json").is_file() and not all(p.is_file() for p in need):
        missing = [str(p) for p in need if not p.is_file()]
        log(f"skipped: the study's data is not there ({', '.join(missing)}); see ../shared/data/README.md")
        return {"skipped": True, "missing": missing}
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "size.json"
    if saved.is_file() and json.loads(saved.read_text()) != asdict(size):
        log(f"error: {work} holds a study of another size ({saved}); use another --work or the same options")
        return {"error": "size mismatch"}
    saved.write_text(json.dumps(asdict(size), indent=2))
    start = time.time()
    reused, ran, busy = [], [], []
    info = prepare_data(work, data, size, a.smoke)
    if not a.report_only:
        teacher = build_teacher(work, size, log)
        # Priority: standard and FULL for every seed first, then the other variants, then SST-2.
        first = [v for v in ("standard", "full") if v in a.variants]
        order = [(v, L, s) for L in a.student_layers for s in a.seeds for v in first]
        order += [(v, L, s) for L in a.student_layers for v in a.variants if v not in first and defined(v, L)
                  for s in a.seeds]
        jobs = [(f"{v}-L{L}-s{s}", lambda v=v, L=L, s=s: run_student(work, size, v, L, s, log)) for v, L, s in order]
        if not a.no_sst:
            jobs.append(("sst:teacher", lambda: run_sst(work, size, work / "teacher", log)))
            jobs += [(f"sst:{v}-L{L}-s{s}", lambda v=v, L=L, s=s: run_sst(work, size, work / "runs" / f"{v}-L{L}-s{s}",
                                                                             log)) for v, L, s in order]
        for name, job in jobs:
            if name.startswith("sst:") and name != "sst:teacher" and \
                    not (work / "runs" / name[4:] / "result.json").is_file():
                busy.append(name)  # its student is not finished (another process is on it)
                continue
            try:
                _, was = job()
            except Busy:
                busy.append(name)
                log(f"{name}: another study process is on it; skipped here")
                continue
            (reused if was else ran).append(name)
    teacher = json.loads((work / "teacher" / "result.json").read_text()) \
        if (work / "teacher" / "result.json").is_file() else {}
    rows = collect(work, a.variants, a.student_layers, a.seeds)
    result = {"teacher": teacher, "data": info, "size": asdict(size), "reused": reused, "ran": ran, "busy": busy,
              "seconds": round(time.time() - start, 1),
              "rows": {f"{v}-L{L}": runs for (v, L), runs in rows.items()}}
    (work / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    if a.report:
        png = Path(a.plot) if a.plot else Path(a.report).parent / "study_diito.png"
        png = plot(rows, teacher.get("perplexity", 0.0), png) or png
        if (work / "teacher" / "sst.json").is_file():
            teacher["sst"] = json.loads((work / "teacher" / "sst.json").read_text())["accuracy"]
        if (work / "teacher" / "result.json").is_file():
            teacher["unigram"] = unigram_perplexity(work, size.max_length)
        shown = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--report-only"]
        command = "python benchmarks/study_diito.py " + shlex.join(shown)
        text = generated_text(rows, teacher, info, size, a.seeds, png if png.is_file() else None, command, work)
        (work / "tables.md").write_text(text + "\n")
        write_section(Path(a.report), text)
        result["plot"] = str(png)
    log(f"done in {result['seconds']:.0f}s: ran {len(ran)}, reused {len(reused)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
