"""Study (b): SST-2 dev accuracy of a small BERT-style student distilled with KD, LWD and TED, 3 seeds.

Data: ../shared/data/sst-2 (train.tsv, dev.tsv; see its README); the study exits with a clear message
when it is absent. A word-level tokenizer (deterministic) is trained on a seeded training subset. The teacher (BERT
architecture, 4 layers, width 128, from random init: no pretrained weights here) is fine-tuned on the
subset first; TED's teacher filters (interval 2: blocks 1 and 3) are trained once (stage 1). Per seed,
one student init (2 layers, width 64) is distilled three ways on the same batches with the same
`ted.stages.stage2` loop: KD (task + T²·KL), LWD (+ α_MSE · MSE of raw teacher states and learned
projections of the student's) and TED (student stage 1 first, then + α_MSE · MSE of filtered states).

    python benchmarks/study_ted.py              # the study (~10 min on a shared 2-core CPU, 1 thread)
    python benchmarks/study_ted.py --quick      # a smoke run
Last line: one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as tf

from applications.distill.ted import stages as tt
from applications.distill.sst import read_labelled
from applications.distill.objectives.ted import TEDConfig

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst-2"


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


def bert(vocab: int, layers: int, width: int, heads: int, seed: int):
    torch.manual_seed(seed)
    return tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * width, max_position_embeddings=128, num_labels=2))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-size", type=int, default=8000)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--alpha-mse", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="outputs/study_ted.json")
    a = ap.parse_args(argv)
    data = Path(a.data)
    if not (data / "train.tsv").is_file() or not (data / "dev.tsv").is_file():
        print(f"skipped: SST-2 not found at {data} (needs train.tsv and dev.tsv; see ../shared/data/README.md)")
        return {"skipped": True}
    if a.quick:
        a.seeds, a.train_size, a.teacher_steps, a.stage1_steps, a.student_steps = [0], 500, 10, 5, 5
    torch.set_num_threads(a.threads)
    start = time.time()
    texts, labels = read_labelled(str(data / "train.tsv"), 2)
    rows = list(range(len(texts)))
    random.Random(1234).shuffle(rows)
    rows = rows[: a.train_size]
    sub = data_dir = Path(a.out).parent / "study_ted_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (sub / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{texts[r]}\t{labels[r]}\n" for r in rows))
    tok = word_tokenizer([texts[r] for r in rows], a.vocab)
    vocab = max(tok.get_vocab().values()) + 1
    train = tt.task_data(str(sub / "train.tsv"), tok, "classification", 64, 2)
    dev = tt.task_data(str(data / "dev.tsv"), tok, "classification", 64, 2)
    print(f"vocab {vocab}, train {len(train)}, dev {len(dev)}", flush=True)

    teacher = bert(vocab, 4, 128, 4, seed=1234)
    tt.finetune(teacher, train, tt.LoopOptions(steps=a.teacher_steps, batch_size=32, learning_rate=5e-4, seed=1234))
    result = {"teacher_dev_accuracy": tt.evaluate(teacher, dev)["accuracy"], "runs": {"kd": {}, "lwd": {}, "ted": {}}}
    print(f"teacher dev acc {result['teacher_dev_accuracy']:.4f} ({time.time() - start:.0f}s)", flush=True)
    s1 = tt.LoopOptions(steps=a.stage1_steps, batch_size=32, learning_rate=1e-3, seed=1234)
    t_filters, t_losses = tt.stage1(teacher, train, interval=2, options=s1)
    result["teacher_stage1_loss"] = [t_losses[0], t_losses[-1]]
    print(f"teacher stage 1 loss {t_losses[0]:.3f} -> {t_losses[-1]:.3f} ({time.time() - start:.0f}s)", flush=True)

    for seed in a.seeds:
        opts = tt.LoopOptions(steps=a.student_steps, batch_size=32, learning_rate=5e-4, seed=seed)
        for mode in ("kd", "lwd", "ted"):
            student = bert(vocab, 2, 64, 2, seed=seed)
            s_filters = None
            if mode == "ted":
                s_filters, _ = tt.stage1(student, train, interval=1, width=128,
                                         options=tt.LoopOptions(steps=a.stage1_steps, batch_size=32,
                                                                learning_rate=1e-3, seed=seed))
            cfg = TEDConfig(mode=mode, teacher_interval=2, student_interval=1, alpha_mse=a.alpha_mse)
            tt.stage2(cfg, teacher, student, train, opts, t_filters if mode == "ted" else None, s_filters)
            acc = tt.evaluate(student, dev)["accuracy"]
            result["runs"][mode][seed] = acc
            print(f"seed {seed} {mode}: dev acc {acc:.4f} ({time.time() - start:.0f}s)", flush=True)
    for name, runs in result["runs"].items():
        vals = list(runs.values())
        result[name] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    result.update(settings={k: v for k, v in vars(a).items() if k != "out"}, vocab=vocab,
                  seconds=round(time.time() - start))
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
