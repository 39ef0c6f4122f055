"""The embedded demo: a small teacher trained on the project's own grammar corpus, distilled into a
standard-KD student and a DIITO student with the same budget, compared on held-out perplexity and
teacher–student IIA. CPU only, no downloads, a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

from .config import DistillConfig
from .corpus import make_corpus
from .data import read_texts, word_tokenizer
from .evaluate import evaluate
from .plot import plot_losses
from .run import pretrain, train


@dataclass(frozen=True)
class DemoSize:
    """Budget knobs of the demo (the defaults take a few minutes on 2 CPU cores)."""

    train_sentences: int = 6000
    eval_sentences: int = 300
    teacher_layers: int = 6
    student_layers: int = 3
    hidden: int = 96
    teacher_steps: int = 900
    student_steps: int = 250
    batch_size: int = 32


QUICK = DemoSize(train_sentences=600, eval_sentences=64, teacher_layers=4, student_layers=2, hidden=32,
                 teacher_steps=30, student_steps=12, batch_size=8)


def tiny_bert(vocab_size: int, layers: int, hidden: int, tokenizer) -> tf.BertForMaskedLM:
    """A small BERT masked LM (4 heads, FFN 2x hidden) sized for the tokenizer."""
    config = tf.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # small data, short budget: no dropout
    return tf.BertForMaskedLM(config)


def write_corpus(folder: Path, size: DemoSize, seed: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sentences = make_corpus(size.train_sentences + size.eval_sentences, seed)
    train_file, eval_file = folder / "train.txt", folder / "eval.txt"
    train_file.write_text("\n".join(sentences[: size.train_sentences]) + "\n")
    eval_file.write_text("\n".join(sentences[size.train_sentences:]) + "\n")
    return train_file, eval_file


def run_demo(output_dir: str = "outputs/demo", size: DemoSize = DemoSize(), seed: int = 0,
             progress: bool = False, log=print) -> dict:
    """Teacher, standard student, DIITO student; returns (and writes) the results table."""
    start = time.time()
    out = Path(output_dir)
    torch.manual_seed(seed)
    train_file, eval_file = write_corpus(out / "corpus", size, seed)
    texts = read_texts(str(train_file))
    tokenizer = word_tokenizer(texts)  # the grammar's words: deterministic ids
    teacher = tiny_bert(len(tokenizer), size.teacher_layers, size.hidden, tokenizer)
    common = {"batch_size": size.batch_size, "max_length": 48, "logging_steps": max(1, size.student_steps // 25),
              "save_steps": 10 ** 9, "progress": progress, "seed": seed, "plot": False,
              "overwrite_output_dir": True}  # the demo owns its directories: a rerun replaces the last one
    log(f"[demo] corpus: {len(texts)} training sentences; teacher: {size.teacher_layers} layers, width {size.hidden}")
    pretrain(teacher, tokenizer, texts, DistillConfig(output_dir=str(out / "teacher"), max_steps=size.teacher_steps,
                                                      learning_rate=2e-3, **common))
    log(f"[demo] teacher trained ({time.time() - start:.0f}s)")
    runs = {}
    for name, recipe in (("standard", "standard"), ("diito", "diito")):
        cfg = DistillConfig(teacher=str(out / "teacher"), train_file=str(train_file), output_dir=str(out / name),
                            student_layers=size.student_layers, recipe=recipe, alignment="full",
                            max_steps=size.student_steps, **common)
        runs[name] = train(cfg)
        log(f"[demo] {name} student distilled ({time.time() - start:.0f}s)")
    eval_texts = read_texts(str(eval_file))
    teacher = tf.AutoModelForMaskedLM.from_pretrained(out / "teacher")
    rows = {"teacher": evaluate(teacher, eval_texts, tokenizer, teacher=teacher, alignment=_identity(teacher))}
    for name in runs:
        student = tf.AutoModelForMaskedLM.from_pretrained(out / name)
        rows[name] = evaluate(student, eval_texts, tokenizer, teacher=teacher, alignment="full")
    plot_losses({name: out / name / "log.csv" for name in runs}, out / "loss_curves.png",
                title="distillation loss: standard vs DIITO")
    table = format_table(rows)
    results = {"rows": {k: {"perplexity": v["perplexity"], "iia": v["iia"]} for k, v in rows.items()},
               "seconds": round(time.time() - start, 1), "size": size.__dict__}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(table)
    log(f"[demo] models, loss curves and results in {out} ({results['seconds']:.0f}s)")
    return results


def _identity(model):
    from interventions import Alignment

    n = model.config.num_hidden_layers
    return Alignment({f"layers.{i}.output": f"layers.{i}.output" for i in range(n)})


def format_table(rows: dict) -> str:
    lines = ["| model | held-out MLM perplexity | teacher-student IIA |", "| --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['perplexity']:.2f} | {r['iia']:.3f} |")
    return "\n".join(lines)
