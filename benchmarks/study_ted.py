"""Study: TED vs KD vs LWD on SST-2 when the student starts the way the paper's does, pre-trained.

TED (Liang et al., ICML 2023) distils a *pre-trained* student: its stage-1 filters select
task-relevant features the frozen student already has. The earlier run of this study used a random
student and found TED last. This study gives all methods one teacher (BERT, 4 layers, width 128,
MLM-pre-trained on WikiText-2, then fine-tuned on SST-2, as the paper's teachers are pre-trained
before their fine-tune) and three student settings, KD / LWD / TED on each, paired per seed (the
same student init and the same batches for the three methods):

* ``pretrained``: 2 layers, width 64, MLM-pre-trained on WikiText-2 first, per seed (the paper's premise);
* ``from_teacher``: 2 layers, width 128, blocks 0 and 2 of the MLM-pre-trained teacher
  (`student.build_student`, DistilBERT's rule); the seed changes only the new classifier head, the
  filter / projection init, dropout and the batch order;
* ``random``: 2 layers, width 64, a seeded random init (the earlier study's setting, rerun).

For every model whose filters TED trains (the teacher's, each TED student's stage 1) the study also
reports each filter's SST-2 dev accuracy (filter + its stage-1 head on the frozen model's block),
so one can see whether a student's filters select anything task-relevant, and linear probes of the
same frozen blocks (logistic regression fitted to convergence, on the first-token state the heads
read and on the token mean), so "nothing to select" and "the filters did not find it" are told apart.

Every piece (data, tokenizer, teacher, teacher filters, each student pre-training, each
distillation run) is cached under --work as a folder holding ``result.json`` (benchmarks/studies.py):
a killed study resumes, a second invocation reuses every finished piece. Data: ../shared/data
(sst-2 train.tsv / dev.tsv, wikitext-2 test.txt / valid.txt); absent, the study says so and exits.

    python benchmarks/study_ted.py --report docs/results.md --work /work/runs/study_ted   # the study
    python benchmarks/study_ted.py --smoke --work /tmp/t                                 # toy size (seconds)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks import studies
from benchmarks.studies import Busy, cached, mean_std, paired, write_section

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HEADING = "## TED vs KD vs LWD on SST-2 (`benchmarks/study_ted.py`)"
NAME = "study_ted"
METHODS = ("kd", "lwd", "ted")
SETTINGS = ("pretrained", "from_teacher", "random")  # the order they run in: the paper's premise first


def short(setting: str, size: Size) -> str:
    """The setting's name in tables and plots, with the student's width."""
    width = size.teacher_width if setting == "from_teacher" else size.student_width
    return {"pretrained": "pre-trained", "from_teacher": "from teacher", "random": "random"}[setting] + f" w{width}"


@dataclass(frozen=True)
class Size:
    """Every budget knob of the study (identical for the three methods and the three settings)."""

    sst_train: int = 8000
    vocab: int = 5000
    max_length: int = 64
    teacher_layers: int = 4
    teacher_width: int = 128
    teacher_heads: int = 4
    teacher_mlm_steps: int = 400
    student_mlm_steps: int = 300
    mlm_lr: float = 1e-3
    mlm_words: int = 24  # words per pre-training sequence (~30 tokens: WikiText's @-@ etc. split in three)
    mlm_eval_sequences: int = 500  # held-out sequences
    teacher_steps: int = 500
    teacher_lr: float = 5e-4
    student_width: int = 64
    student_heads: int = 2
    stage1_steps: int = 150
    stage1_lr: float = 1e-3
    student_steps: int = 300
    student_lr: float = 1e-3
    batch_size: int = 32
    alpha_mse: float = 10.0


SMOKE = Size(sst_train=48, vocab=200, max_length=24, teacher_layers=4, teacher_width=32, teacher_heads=2,
             teacher_mlm_steps=3, student_mlm_steps=2, mlm_eval_sequences=16, teacher_steps=3, student_width=16,
             stage1_steps=2, student_steps=2, batch_size=8)


# -- data ------------------------------------------------------------------------------------------
def prepare_data(work: Path, data: Path, size: Size, smoke: bool) -> dict:
    """sst_train.tsv (a seeded subset), sst_dev.tsv, mlm_train.txt / mlm_eval.txt (WikiText-2 segments), tokenizer."""

    def compute(folder: Path) -> dict:
        if smoke:
            from applications.distill.corpus import make_corpus

            text = make_corpus(120, seed=0)
            mlm_train, mlm_eval = text[:100], text[100:100 + size.mlm_eval_sequences]
            sst = [f"{s}\t{int('dog' in s or 'cat' in s)}" for s in make_corpus(size.sst_train + 24, seed=1)]
            random.Random(0).shuffle(sst)
            sst_train, sst_dev = sst[:size.sst_train], sst[size.sst_train:]
        else:
            held = segments((data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8"), size.mlm_words)
            mlm_train = segments((data / "wikitext-2" / "test.txt").read_text(encoding="utf-8"), size.mlm_words) + \
                held[size.mlm_eval_sequences:]
            mlm_eval = held[:size.mlm_eval_sequences]
            lines = (data / "sst-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
            sst_train = random.Random(1234).sample(lines, size.sst_train)  # a fixed seeded subset
            sst_dev = (data / "sst-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
        (folder / "mlm_train.txt").write_text("\n".join(mlm_train) + "\n", encoding="utf-8")
        (folder / "mlm_eval.txt").write_text("\n".join(mlm_eval) + "\n", encoding="utf-8")
        for name, rows in (("sst_train.tsv", sst_train), ("sst_dev.tsv", sst_dev)):
            (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
        tok = word_tokenizer([r.rsplit("\t", 1)[0] for r in sst_train] + mlm_train, size.vocab)
        tok.save_pretrained(str(folder / "tokenizer"))
        return {"mlm_train": len(mlm_train), "mlm_eval": len(mlm_eval), "sst_train": len(sst_train),
                "sst_dev": len(sst_dev), "mlm_words": sum(len(s.split()) for s in mlm_train),
                "vocab": max(tok.get_vocab().values()) + 1}

    return cached(work / "data", compute)[0]


def segments(text: str, words: int, min_words: int = 5) -> list[str]:
    """WikiText paragraphs cut into consecutive pieces of `words` words (BERT packs its pre-training text
    into full-length sequences: no batch is mostly padding); headings and short tails dropped."""
    out = []
    for line in text.splitlines():
        toks = line.split()
        if not toks or line.strip().startswith("="):
            continue
        out += [" ".join(toks[i:i + words]) for i in range(0, len(toks), words) if len(toks[i:i + words]) >= min_words]
    return out


def word_tokenizer(texts: list[str], vocab_size: int):
    """A BERT-style word-level tokenizer ([CLS] words [SEP]); deterministic, unlike WordPiece training,
    whose ties between equally frequent merges are broken differently from run to run."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                              ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


class Context:
    """What every piece reads: the tokenizer and the tokenized SST-2 train / dev sets (built once per process)."""

    def __init__(self, work: Path, size: Size):
        from transformers import PreTrainedTokenizerFast

        from applications.distill.ted import stages as tt

        self.work, self.size = work, size
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(work / "data" / "tokenizer"))
        self.vocab = max(self.tokenizer.get_vocab().values()) + 1
        d = work / "data"
        self.train = tt.task_data(str(d / "sst_train.tsv"), self.tokenizer, "classification", size.max_length, 2)
        self.dev = tt.task_data(str(d / "sst_dev.tsv"), self.tokenizer, "classification", size.max_length, 2)


# -- models ----------------------------------------------------------------------------------------
def bert_config(vocab: int, layers: int, width: int, heads: int, max_length: int):
    import transformers as tf

    return tf.BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * width, max_position_embeddings=max(128, max_length), num_labels=2,
                         pad_token_id=0)


def classifier_from(mlm_dir: Path, seed: int):
    """A sequence classifier with the encoder of a saved masked LM; a seeded new pooler and classifier."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    tf.logging.set_verbosity_error()  # the new pooler / classifier are expected; no load report
    model = tf.BertForSequenceClassification.from_pretrained(str(mlm_dir), num_labels=2)
    model.config.architectures = [type(model).__name__]
    return model


def mlm_pretrain(ctx: Context, out: Path, layers: int, width: int, heads: int, steps: int, seed: int) -> dict:
    """A BERT masked LM from a seeded random init, pre-trained by `run.pretrain` on WikiText-2; held-out perplexity."""
    import torch
    import transformers as tf

    from applications.distill.cli import build_parser, run_eval
    from applications.distill.config import DistillConfig
    from applications.distill.data import read_texts
    from applications.distill.run import pretrain

    size = ctx.size
    start = time.time()
    torch.manual_seed(seed)
    model = tf.BertForMaskedLM(bert_config(ctx.vocab, layers, width, heads, size.max_length))
    cfg = DistillConfig(output_dir=str(out / "model"), max_steps=steps, learning_rate=size.mlm_lr,
                        batch_size=size.batch_size, max_length=size.max_length, save_steps=10 ** 9,
                        logging_steps=max(1, steps // 20), progress=False, plot=False, seed=seed,
                        mlm_smoothing=0.0, overwrite_output_dir=True)  # a killed pretraining restarts
    log = pretrain(model, ctx.tokenizer, read_texts(str(ctx.work / "data" / "mlm_train.txt")), cfg)
    seconds = time.time() - start
    ev = run_eval(build_parser().parse_args(
        ["eval", "--model", str(out / "model"), "--eval-file", str(ctx.work / "data" / "mlm_eval.txt"),
         "--max-length", str(size.max_length), "--batch-size", "32"]))
    return {"perplexity": ev["perplexity"], "train_loss": log["train_loss"], "steps": log["global_step"],
            "train_seconds": round(seconds, 1), "seconds_per_step": seconds / steps}


def teacher_piece(ctx: Context, log) -> dict:
    """MLM pre-training (once), then the SST-2 fine-tune; the classifier is saved for the later pieces."""
    from applications.distill.ted import stages as tt

    size, work = ctx.size, ctx.work
    mlm, _ = cached(work / "teacher_mlm", lambda out: mlm_pretrain(
        ctx, out, size.teacher_layers, size.teacher_width, size.teacher_heads, size.teacher_mlm_steps, 1234))

    def compute(out: Path) -> dict:
        start = time.time()
        model = classifier_from(work / "teacher_mlm" / "model", 1234)
        losses = tt.finetune(model, ctx.train, tt.LoopOptions(steps=size.teacher_steps, batch_size=size.batch_size,
                                                             learning_rate=size.teacher_lr,
                                                             max_length=size.max_length, seed=1234))
        model.save_pretrained(str(out / "model"))
        acc = tt.evaluate(model, ctx.dev)["accuracy"]
        log(f"teacher: MLM perplexity {mlm['perplexity']:.1f}, SST-2 dev accuracy {acc:.4f}")
        return {"accuracy": acc, "loss": [losses[0], losses[-1]], "train_seconds": round(time.time() - start, 1)}

    result, _ = cached(work / "teacher", compute)
    return {**result, "mlm": mlm}


def load_teacher(work: Path):
    import transformers as tf

    return tf.BertForSequenceClassification.from_pretrained(str(work / "teacher" / "model")).eval()


def filter_accuracy(model, filters, data, batch_size: int = 64) -> list[float]:
    """Dev accuracy of each stage-1 filter with its own head, on the frozen model's block outputs."""
    import torch

    from applications.distill.ted import stages as tt

    model.eval()
    filters.eval()
    collate = data.collator()
    right, total = [0] * len(filters.layers), 0
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        with torch.no_grad():
            _, states = tt.forward_states(model, {k: batch[k] for k in ("input_ids", "attention_mask")},
                                          filters.layers)
            for m, (h, head) in enumerate(zip(filters(states), filters.heads)):
                right[m] += int((head(h).argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return [r / total for r in right]


def teacher_filters_piece(ctx: Context, log) -> dict:
    """The teacher's stage 1 (interval 2: blocks 1, 3), once; saved for TED's stage 2."""
    from applications.distill.ted import stages as tt

    size = ctx.size

    def compute(out: Path) -> dict:
        teacher = load_teacher(ctx.work)
        filters, losses = tt.stage1(teacher, ctx.train, interval=2, options=tt.LoopOptions(
            steps=size.stage1_steps, batch_size=size.batch_size, learning_rate=size.stage1_lr,
            max_length=size.max_length, seed=1234))
        tt.save_filters(filters, out / "filters.pt", teacher)
        acc = filter_accuracy(teacher, filters, ctx.dev)
        log(f"teacher filters (blocks {filters.layers}): dev accuracy {[round(a, 4) for a in acc]}")
        return {"layers": filters.layers, "accuracy": acc, "loss": [losses[0], losses[-1]]}

    return cached(ctx.work / "teacher_filters", compute)[0]


def block_features(model, data, layers: list[int], batch_size: int = 64):
    """Per block: the first-token state (what TED's filter heads read) and the mean over non-padding tokens."""
    import torch

    from applications.distill.ted import stages as tt

    model.eval()
    collate = data.collator()
    cls, mean = {i: [] for i in layers}, {i: [] for i in layers}
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        with torch.no_grad():
            _, states = tt.forward_states(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, layers)
        m = batch["attention_mask"].unsqueeze(-1).to(states[0].dtype)
        for i, h in zip(layers, states):
            cls[i].append(h[:, 0])
            mean[i].append((h * m).sum(1) / m.sum(1))
    return {i: (torch.cat(cls[i]), torch.cat(mean[i])) for i in layers}


def linear_probe(x_train, y_train, x_dev, y_dev, l2: float = 1e-3, iterations: int = 200) -> float:
    """Dev accuracy of an L2-regularised logistic regression fitted to convergence (full-batch L-BFGS, zero init,
    features z-scored with the training statistics): how much of the task a linear read-out of the frozen features
    can find, free of the filters' short optimisation."""
    import torch
    import torch.nn.functional as F

    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xd = ((x_train - mu) / sd).double(), ((x_dev - mu) / sd).double()
    w = torch.zeros(xt.shape[1], 2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, y_train) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xd @ w + b).argmax(-1) == y_dev).double().mean())


def probe_piece(ctx: Context, name: str, build, layers: list[int]) -> dict:
    """Linear probes (CLS state and token mean) on each of `layers` of the frozen model `build()`; cached."""
    import torch

    def compute(out: Path) -> dict:
        model = build()
        tr, dv = block_features(model, ctx.train, layers), block_features(model, ctx.dev, layers)
        ytr, ydv = torch.tensor(ctx.train.labels), torch.tensor(ctx.dev.labels)
        return {"layers": layers,
                "cls": [linear_probe(tr[i][0], ytr, dv[i][0], ydv) for i in layers],
                "mean": [linear_probe(tr[i][1], ytr, dv[i][1], ydv) for i in layers]}

    return cached(ctx.work / "probes" / name, compute)[0]


PROBED = {"teacher": "teacher, fine-tuned", "teacher_mlm": "teacher, MLM only (before its fine-tune)"}


def run_probes(ctx: Context, settings, seeds, log) -> None:
    """Probe the teacher (before and after its fine-tune, blocks 1, 3) and each setting's student init (blocks 0, 1)."""
    probe_piece(ctx, "teacher", lambda: load_teacher(ctx.work), [1, 3])
    probe_piece(ctx, "teacher_mlm", lambda: classifier_from(ctx.work / "teacher_mlm" / "model", 1234), [1, 3])
    for st in settings:
        for s in seeds:
            r = probe_piece(ctx, f"{st}-s{s}", lambda st=st, s=s: student_init(ctx, st, s, log), [0, 1])
            log(f"probe {st} seed {s}: CLS {[round(a, 4) for a in r['cls']]}, mean {[round(a, 4) for a in r['mean']]}")


def probe_table(work: Path, settings, seeds, size: Size) -> str:
    lines = ["| model | block | probe on the first-token state (what TED's heads read) | probe on the mean over tokens |",
             "| --- | --- | --- | --- |"]
    rows = [(PROBED[n], [read(work / "probes" / n / "result.json")]) for n in PROBED]
    rows += [(f"{short(st, size)} student at its init", [read(work / "probes" / f"{st}-s{s}" / "result.json")
                                                          for s in seeds]) for st in settings]
    for label, results in rows:
        results = [r for r in results if r]
        if not results:
            continue
        for i, layer in enumerate(results[0]["layers"]):
            cells = [mean_std(pct(r[key][i] for r in results)) if len(results) > 1 else f"{100 * results[0][key][i]:.2f}"
                     for key in ("cls", "mean")]
            lines.append(f"| {label} | {layer} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def student_init(ctx: Context, setting: str, seed: int, log):
    """The seed's student for `setting`, built the same way for each method (same weights, same head)."""
    import torch
    import transformers as tf

    from applications.distill.student import build_student

    size = ctx.size
    if setting == "random":
        torch.manual_seed(seed)
        return tf.BertForSequenceClassification(bert_config(ctx.vocab, 2, size.student_width, size.student_heads,
                                                            size.max_length))
    if setting == "pretrained":
        folder = ctx.work / "student_mlm" / f"s{seed}"
        res, reused = cached(folder, lambda out: mlm_pretrain(ctx, out, 2, size.student_width, size.student_heads,
                                                              size.student_mlm_steps, seed))
        if not reused:
            log(f"student MLM seed {seed}: perplexity {res['perplexity']:.1f} ({res['train_seconds']:.0f}s)")
        return classifier_from(folder / "model", seed)
    if setting == "from_teacher":
        return build_student(classifier_from(ctx.work / "teacher_mlm" / "model", seed), 2)  # blocks 0 and 2
    raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")


def run_piece(ctx: Context, setting: str, method: str, seed: int, log) -> tuple[dict, bool]:
    """One distillation run (stage 2; for TED the student's stage 1 first); dev accuracy. Cached."""
    from applications.distill.objectives.ted import TEDConfig
    from applications.distill.ted import stages as tt

    size = ctx.size

    def compute(out: Path) -> dict:
        start = time.time()
        teacher = load_teacher(ctx.work)
        student = student_init(ctx, setting, seed, log)
        result = {"setting": setting, "method": method, "seed": seed,
                  "init_accuracy": tt.evaluate(student, ctx.dev)["accuracy"]}
        t_filters = s_filters = None
        if method == "ted":
            t_filters = tt.load_filters(ctx.work / "teacher_filters" / "filters.pt", "teacher")
            s_filters, losses = tt.stage1(student, ctx.train, interval=1, width=size.teacher_width,
                                          options=tt.LoopOptions(steps=size.stage1_steps, batch_size=size.batch_size,
                                                                 learning_rate=size.stage1_lr,
                                                                 max_length=size.max_length, seed=seed))
            result["filter_layers"] = s_filters.layers
            result["filter_accuracy"] = filter_accuracy(student, s_filters, ctx.dev)
            result["stage1_loss"] = [losses[0], losses[-1]]
        cfg = TEDConfig(mode=method, teacher_interval=2, student_interval=1, alpha_mse=size.alpha_mse)
        opts = tt.LoopOptions(steps=size.student_steps, batch_size=size.batch_size, learning_rate=size.student_lr,
                              max_length=size.max_length, seed=seed)
        t2 = time.time()
        _, logged = tt.stage2(cfg, teacher, student, ctx.train, opts, t_filters, s_filters)
        result.update(accuracy=tt.evaluate(student, ctx.dev)["accuracy"], stage2_seconds=round(time.time() - t2, 1),
                      train_seconds=round(time.time() - start, 1), final_loss=logged[-1] if logged else None)
        log(f"{setting} {method} seed {seed}: dev accuracy {result['accuracy']:.4f} ({result['train_seconds']:.0f}s)")
        return result

    return cached(ctx.work / "runs" / f"{setting}-{method}-s{seed}", compute)


# -- report ----------------------------------------------------------------------------------------
def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(work: Path, settings, seeds) -> dict:
    """setting -> method -> seed -> finished run result."""
    rows = {}
    for st in settings:
        rows[st] = {}
        for m in METHODS:
            rows[st][m] = {}
            for s in seeds:
                p = work / "runs" / f"{st}-{m}-s{s}" / "result.json"
                if p.is_file():
                    rows[st][m][s] = json.loads(p.read_text())
    return rows


def pct(values) -> list[float]:
    return [100 * v for v in values]


def accuracy_table(rows: dict, teacher: dict, seeds, size: Size) -> str:
    lines = ["| student | method | SST-2 dev accuracy % per seed (" + ", ".join(map(str, seeds)) + ") | mean ± std |",
             "| --- | --- | --- | --- |"]
    if teacher:
        lines.append(f"| teacher ({size.teacher_layers} layers, width {size.teacher_width}, MLM-pre-trained, "
                     "fine-tuned) | — | "
                     f"{100 * teacher['accuracy']:.2f} | — |")
    for st, by_method in rows.items():
        if not any(by_method.values()):
            continue
        init = [r["init_accuracy"] for r in by_method.get("kd", {}).values()]
        lines.append(f"| {short(st, size)} | before distillation (new head) | " + ", ".join(f"{100 * v:.2f}" for v in init)
                     + f" | {mean_std(pct(init))} |")
        for m, runs in by_method.items():
            vals = [runs[s]["accuracy"] for s in seeds if s in runs]
            per = ", ".join(f"{100 * runs[s]['accuracy']:.2f}" if s in runs else "—" for s in seeds)
            lines.append(f"| {short(st, size)} | {m.upper()} | {per} | **{mean_std(pct(vals))}** |")
    return "\n".join(lines)


def delta_table(rows: dict, seeds, size: Size) -> str:
    pairs = (("lwd", "kd"), ("ted", "kd"), ("ted", "lwd"))
    lines = ["| student | " + " | ".join(f"{a.upper()} − {b.upper()} (points; per seed; mean ± std)" for a, b in pairs)
             + " |", "| --- | --- | --- | --- |"]
    for st, by_method in rows.items():
        if not any(by_method.values()):
            continue
        cells = []
        for a, b in pairs:
            d = pct(paired(by_method[a], by_method[b], "accuracy"))
            cells.append(", ".join(f"{x:+.2f}" for x in d) + f"; **{mean_std(d, '+.2f')}**" if d else "—")
        lines.append(f"| {short(st, size)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def filter_table(rows: dict, t_filters: dict, seeds, size: Size) -> str:
    lines = ["| model | filter on block | SST-2 dev accuracy % of filter + head (per seed) | mean ± std |",
             "| --- | --- | --- | --- |"]
    if t_filters:
        for layer, acc in zip(t_filters["layers"], t_filters["accuracy"]):
            lines.append(f"| teacher | {layer} | {100 * acc:.2f} | — |")
    for st, by_method in rows.items():
        ted = by_method.get("ted", {})
        if not ted:
            continue
        layers = next(iter(ted.values()))["filter_layers"]
        for i, layer in enumerate(layers):
            vals = [ted[s]["filter_accuracy"][i] for s in seeds if s in ted]
            lines.append(f"| {short(st, size)} (TED's stage 1, student frozen at its init) | {layer} | "
                         + ", ".join(f"{100 * v:.2f}" for v in vals) + f" | {mean_std(pct(vals))} |")
    return "\n".join(lines)


def stage1_losses(rows: dict, t_filters: dict, size: Size) -> str:
    """One line: each model's stage-1 loss (task loss averaged over its filters), first → last logged step."""
    parts = [f"teacher {t_filters['loss'][0]:.3f} → {t_filters['loss'][1]:.3f}"] if t_filters else []
    for st, by_method in rows.items():
        for s, r in sorted(by_method.get("ted", {}).items()):
            parts.append(f"{short(st, size)} seed {s} {r['stage1_loss'][0]:.3f} → {r['stage1_loss'][1]:.3f}")
    return ("Stage-1 loss (the task loss averaged over a model's filters, first → last logged step; ln 2 = 0.693 "
            "is chance): " + "; ".join(parts) + ".") if parts else ""


def plot(rows: dict, teacher: dict, t_filters: dict, path: Path, size: Size, majority: float,
         work: Path) -> Path | None:
    """Left: dev accuracy per setting and method (mean ± std, each seed a dot). Right: filter accuracy per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [st for st in rows if any(rows[st].values())]
    if not shown:
        return None
    colors = {"kd": "#777", "lwd": "#27a", "ted": "#d62"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, st in enumerate(shown):
        for j, m in enumerate(METHODS):
            vals = pct(r["accuracy"] for r in rows[st][m].values())
            if not vals:
                continue
            x = i + (j - 1) * 0.25
            ax.scatter([x] * len(vals), vals, s=14, color=colors[m], alpha=0.5, zorder=2)
            ax.errorbar([x], [statistics.mean(vals)], yerr=[statistics.stdev(vals) if len(vals) > 1 else 0.0],
                        fmt="o", ms=8, capsize=5, color=colors[m], zorder=3, label=m.upper() if i == 0 else None)
    if teacher:
        ax.axhline(100 * teacher["accuracy"], color="k", ls="--", lw=1, label=f"teacher {100 * teacher['accuracy']:.2f}")
    ax.set_xticks(range(len(shown)), [short(s, size) for s in shown])
    ax.set_ylabel("SST-2 dev accuracy %")
    ax.set_title("students after distillation: mean ± std (large), each seed (small)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    names, means, errs, probes = [], [], [], []

    def probe(name: str, i: int) -> float:
        found = [r["cls"][i] for r in (read(work / "probes" / n / "result.json") for n in name) if r]
        return 100 * statistics.mean(found) if found else float("nan")

    if t_filters:
        for i, (layer, acc) in enumerate(zip(t_filters["layers"], t_filters["accuracy"])):
            names.append(f"teacher\nblock {layer}")
            means.append(100 * acc)
            errs.append(0.0)
            probes.append(probe(["teacher"], i))
    for st in shown:
        ted = rows[st]["ted"]
        if not ted:
            continue
        layers = next(iter(ted.values()))["filter_layers"]
        for i, layer in enumerate(layers):
            vals = [100 * r["filter_accuracy"][i] for r in ted.values()]
            names.append(short(st, size).replace(" ", "\n") + f"\nblock {layer}")
            probes.append(probe([f"{st}-s{s}" for s in ted], i))
            means.append(statistics.mean(vals))
            errs.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    bx.bar(range(len(names)), means, yerr=errs, capsize=4,
           color=["#333" if n.startswith("teacher") else "#d62" for n in names], alpha=0.8)
    bx.scatter(range(len(names)), probes, marker="x", s=60, color="k", zorder=4,
               label="linear probe of the same first-token state, fitted to convergence")
    bx.axhline(100 * majority, color="k", ls=":", lw=1, label=f"majority class ({100 * majority:.2f})")
    if teacher:
        bx.axhline(100 * teacher["accuracy"], color="k", ls="--", lw=1, label="teacher itself")
    bx.set_xticks(range(len(names)), names, fontsize=7)
    bx.set_ylim(40, 100)
    bx.set_ylabel("SST-2 dev accuracy % of filter + its head")
    bx.set_title("stage-1 filters (bars): does each block's filter select the task?\nmean ± std over seeds; "
                 "x: a linear probe of the same state", fontsize=10)
    bx.legend(fontsize=8)
    bx.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def majority_share(work: Path) -> float:
    """The dev accuracy of always answering the most frequent dev label (what a classifier that learnt nothing scores)."""
    from applications.distill.sst import read_labelled

    _, labels = read_labelled(str(work / "data" / "sst_dev.tsv"), 2)
    return max(labels.count(0), labels.count(1)) / len(labels)


def unigram_perplexity(work: Path, max_length: int) -> float:
    """Reference for the MLM perplexities: held-out perplexity of the training unigram distribution (add-one).

    A masked LM that ignores context cannot beat it by much (cached in work/unigram.json)."""
    from transformers import PreTrainedTokenizerFast

    cache = work / "unigram.json"
    if cache.is_file():
        return json.loads(cache.read_text())["perplexity"]
    tok = PreTrainedTokenizerFast.from_pretrained(str(work / "data" / "tokenizer"))

    def texts(name):
        return (work / "data" / name).read_text(encoding="utf-8").splitlines()

    ppl = studies.unigram_perplexity(tok, texts("mlm_train.txt"), texts("mlm_eval.txt"), max_length)
    cache.write_text(json.dumps({"perplexity": ppl}))
    return ppl


def timing(work: Path) -> dict:
    """Wall clock from the data's preparation to the newest finished piece; summed run seconds."""
    pieces = list(work.rglob("result.json"))
    first = (work / "data" / "result.json").stat().st_mtime
    last = max(p.stat().st_mtime for p in pieces)
    runs = [json.loads(p.read_text()) for p in (work / "runs").glob("*/result.json")] if (work / "runs").is_dir() else []
    return {"wall_minutes": (last - first) / 60, "run_minutes": sum(r.get("train_seconds", 0) for r in runs) / 60}


def generated_text(rows, teacher, t_filters, pre, info, size: Size, seeds, png, command, work: Path) -> str:
    import torch

    unigram = unigram_perplexity(work, size.max_length)
    clock = timing(work)
    expected = len(rows) * len(METHODS) * len(seeds)
    done = sum(len(r) for by in rows.values() for r in by.values())
    missing = [f"{st} {m.upper()} seed {s}" for st, by in rows.items() for m, r in by.items() for s in seeds
               if s not in r]
    lines = ["Regenerate (resumes from the cache in `--work`; finished pieces are reused):", "", "```", command, "```",
             "", (f"Hardware: {platform.machine()} CPU, {__import__('os').cpu_count()} cores shared with other jobs, "
                  f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s). Wall clock from the first "
                  f"piece to the last finished one: **{clock['wall_minutes']:.0f} min** (distillation runs alone: "
                  f"{clock['run_minutes']:.0f} min summed). Runs finished: {done}/{expected}.")]
    if missing:
        lines += ["", f"**Partial study.** Missing runs: {', '.join(missing)}."]
    mlm = teacher.get("mlm", {}) if teacher else {}
    pre_ppl = [p["perplexity"] for p in pre.values()]
    lines += ["", (f"Data: SST-2, a fixed seeded subset of {info.get('sst_train')} training sentences, all "
                   f"{info.get('sst_dev')} dev sentences (accuracy); MLM pre-training on {info.get('mlm_train')} "
                   f"WikiText-2 sequences of up to {size.mlm_words} consecutive words ({info.get('mlm_words')} words: "
                   f"`test.txt` and `valid.txt` but its first {info.get('mlm_eval')} sequences, held out for "
                   f"perplexity). One word-level tokenizer "
                   f"(vocabulary {info.get('vocab')}) trained on the SST-2 subset and the WikiText-2 text together; "
                   f"inputs truncated to {size.max_length} tokens."), "",
              (f"Teacher: BERT, {size.teacher_layers} layers, width {size.teacher_width}, {size.teacher_heads} "
               f"heads, MLM-pre-trained ({size.teacher_mlm_steps} steps, batch {size.batch_size}, lr {size.mlm_lr}; "
               f"held-out perplexity {mlm.get('perplexity', float('nan')):.1f}; the training unigram distribution "
               f"scores {unigram:.1f} on the same tokens), then fine-tuned on SST-2 "
               f"({size.teacher_steps} steps, lr {size.teacher_lr}). Its stage-1 filters (linear, width "
               f"{size.teacher_width}, blocks 1 and 3) trained once ({size.stage1_steps} steps, lr {size.stage1_lr})."),
              "",
              (f"Students, per seed (the same init and batches for KD, LWD and TED): pre-trained = 2 layers, width "
               f"{size.student_width}, {size.student_heads} heads, MLM-pre-trained from a seeded init "
               f"({size.student_mlm_steps} steps, same recipe; held-out perplexity "
               f"{mean_std(pre_ppl, '.1f')} over seeds); from teacher = 2 layers, width {size.teacher_width}, the "
               f"MLM-pre-trained teacher's embeddings and blocks 0 and 2 (`student.build_student`), a seeded new "
               f"pooler + classifier (so its seeds differ only there, in the LWD projection / TED filter init, "
               f"dropout and batch order); random = the pre-trained student's shape from a seeded random init. "
               f"Stage 2: {size.student_steps} steps, batch {size.batch_size}, lr {size.student_lr}, α_task = 1, "
               f"α_KL = 1, T = 2, α_MSE = {size.alpha_mse}; TED's student stage 1: filters `Linear(d → "
               f"{size.teacher_width})` on blocks 0 and 1, {size.stage1_steps} steps, student frozen. KD: task + "
               f"T²·KL; LWD: + α_MSE · MSE(projected student block, raw teacher block); TED: + α_MSE · MSE between "
               f"filtered states. No hyper-parameter was tuned for any method."), "",
              accuracy_table(rows, teacher, seeds, size), "",
              f"Always answering the dev set's majority class scores {100 * majority_share(work):.2f} %.", "", "Paired differences (same seed: same init, same batches):", "",
              delta_table(rows, seeds, size), "",
              "Stage-1 filter accuracy (each filter with its own stage-1 head, on the frozen model's block output):",
              "", filter_table(rows, t_filters, seeds, size), "", stage1_losses(rows, t_filters, size), ""]
    probes = probe_table(work, list(rows), seeds, size)
    if probes.count("\n") > 1:
        lines += [("Linear probes of the same frozen blocks (SST-2 dev accuracy %; logistic regression fitted to "
                   "convergence on z-scored features of the training subset; mean ± std over seeds): is the task "
                   "there to select, at the first token or anywhere in the sequence?"), "", probes, ""]
    if png is not None:
        lines += [f"![SST-2 accuracy by setting and method; stage-1 filter accuracy]({png.name})", ""]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------
def main(argv=None, log=print) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA), help="folder holding sst-2/ and wikitext-2/")
    ap.add_argument("--work", default="outputs/study_ted", help="cache of every finished piece (resumable)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--smoke", action="store_true", help="toy size on a synthetic corpus (seconds)")
    ap.add_argument("--report", help="results markdown to put the study's section in (e.g. docs/results.md)")
    ap.add_argument("--plot", help="plot PNG (default: study_ted.png next to --report)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from cached results")
    for f in Size.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    a = ap.parse_args(argv)
    base = SMOKE if a.smoke else Size()
    size = Size(**{**asdict(base), **{k: getattr(a, k) for k in asdict(base) if getattr(a, k) is not None}})
    data, work = Path(a.data), Path(a.work)
    need = [data / "sst-2" / "train.tsv", data / "sst-2" / "dev.tsv", data / "wikitext-2" / "test.txt",
            data / "wikitext-2" / "valid.txt"]
    if not a.smoke and not (work / "data" / "result.json").is_file() and not all(p.is_file() for p in need):
        missing = [str(p) for p in need if not p.is_file()]
        log(f"skipped: the study's data is not there ({', '.join(missing)}); see ../shared/data/README.md")
        return {"skipped": True, "missing": missing}
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()  # no weight-loading bars in the study's log
    import gc

    from applications.distill.ted import stages  # noqa: F401  (the heavy imports, once, before the freeze)

    gc.freeze()  # every Trainer's teardown runs gc.collect(); without the freeze it walks all of transformers
    if a.threads:
        torch.set_num_threads(a.threads)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "size.json"
    if saved.is_file() and json.loads(saved.read_text()) != asdict(size):
        log(f"error: {work} holds a study of another size ({saved}); use another --work or the same options")
        return {"error": "size mismatch"}
    saved.write_text(json.dumps(asdict(size), indent=2))
    start = time.time()
    info = prepare_data(work, data, size, a.smoke)
    ran, reused, busy = [], [], []
    if not a.report_only:
        ctx = Context(work, size)
        teacher_piece(ctx, log)
        teacher_filters_piece(ctx, log)
        for st in a.settings:
            for s in a.seeds:
                for m in METHODS:
                    name = f"{st}-{m}-s{s}"
                    try:
                        _, was = run_piece(ctx, st, m, s, log)
                    except Busy:
                        busy.append(name)
                        log(f"{name}: another study process is on it; skipped here")
                        continue
                    (reused if was else ran).append(name)
        try:
            run_probes(ctx, a.settings, a.seeds, log)
        except Busy:
            busy.append("probes")
    teacher = read(work / "teacher" / "result.json")
    if teacher:
        teacher["mlm"] = read(work / "teacher_mlm" / "result.json")
    t_filters = read(work / "teacher_filters" / "result.json")
    pre = {s: read(work / "student_mlm" / f"s{s}" / "result.json") for s in a.seeds
           if (work / "student_mlm" / f"s{s}" / "result.json").is_file()}
    rows = collect(work, a.settings, a.seeds)
    result = {"teacher": teacher, "teacher_filters": t_filters, "student_mlm": pre, "data": info, "size": asdict(size),
              "ran": ran, "reused": reused, "busy": busy, "seconds": round(time.time() - start, 1), "rows": rows}
    (work / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    if a.report:
        png = Path(a.plot) if a.plot else Path(a.report).parent / "study_ted.png"
        png = plot(rows, teacher, t_filters, png, size, majority_share(work), work) or png
        shown = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--report-only"]
        command = "python benchmarks/study_ted.py " + shlex.join(shown)
        text = generated_text(rows, teacher, t_filters, pre, info, size, a.seeds, png if png.is_file() else None,
                              command, work)
        (work / "tables.md").write_text(text + "\n")
        write_section(Path(a.report), HEADING, text, NAME)
        result["plot"] = str(png)
    log(f"done in {result['seconds']:.0f}s: ran {len(ran)}, reused {len(reused)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
