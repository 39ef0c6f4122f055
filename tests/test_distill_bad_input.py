"""Bad input to the distillation CLI: each case is one line on stderr, exit code 2, no traceback, and
nothing written (no output directory) — checked through `cli.main`, without a subprocess."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers as tf

from applications.distill.cli import main
from applications.distill.corpus import make_corpus
from applications.distill.data import train_tokenizer
from applications.distill.ted import cli as ted_cli

tf.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny BERT teacher, a GPT-2 teacher of the same vocabulary size, a BERT with another tokenizer."""
    root = tmp_path_factory.mktemp("bad_input")
    texts = make_corpus(60, seed=4)
    (root / "train.txt").write_text("\n".join(texts) + "\n")
    tok = train_tokenizer(texts, 120, causal=False)
    vocab = len(tok)
    torch.manual_seed(0)
    bert = lambda layers: tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id))
    bert(4).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    gpt = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64))
    gpt.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")  # same tokenizer, same vocabulary size: only the kind differs
    other = train_tokenizer([t[::-1] for t in texts], vocab, causal=False)  # another vocabulary, same size
    assert len(other) == vocab and other.get_vocab() != tok.get_vocab()
    bert(2).save_pretrained(root / "other_tok")
    other.save_pretrained(root / "other_tok")
    bpe = train_tokenizer(texts, 300, causal=True)  # byte-level BPE: no special tokens around a line
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(bpe), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)).save_pretrained(root / "gpt2_bpe")
    bpe.save_pretrained(root / "gpt2_bpe")
    return root


def _train(root, out, *extra):
    return ["train", "--teacher", str(root / "teacher"), "--train-file", str(root / "train.txt"),
            "--output-dir", str(out), "--student-layers", "2", "--no-progress", *extra]


def _refused(capsys, code, out, message):
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "an output directory was created for a refused run"


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "0"], "max_steps (--max-steps) must be >= 1, got 0"),  # ran one step before
    (["--max-steps", "-5"], "max_steps (--max-steps) must be >= 1, got -5"),  # ran three epochs before
    (["--max-steps", "0", "--num-train-epochs", "0"], "must be >= 1, got 0"),  # saved an untrained student
    (["--num-epochs", "0"], "num_epochs (--num-train-epochs) must be > 0"),
    (["--logging-steps", "0"], "logging_steps (--logging-steps) must be >= 1"),
    (["--save-steps", "0"], "save_steps (--save-steps) must be >= 1"),
    (["--gradient-accumulation-steps", "0"], "grad_accum (--gradient-accumulation-steps) must be >= 1"),
    (["--student-layers", "two"], "student_layers (--student-layers) must be a number of layers"),
    (["--max-steps", "ten"], "max_steps (--max-steps) must be an integer, got 'ten'"),
    (["--learning-rate", "fast"], "learning_rate (--learning-rate) must be a number"),
    (["--batch-size", "1"], "need a batch of >= 2 examples per device"),  # DIITO swapped each row with itself
    (["--per-device-train-batch-size", "1", "--objectives", "mlm,diito_cos"], "need a batch of >= 2"),
    (["--resume", "/nonexistent"], "is not a checkpoint directory"),
    (["--objectives", "mlm,kd"], "unknown objective 'kd'"),
    (["--objectives", "clm,ce"], "objective 'clm' does not fit a masked LM teacher"),
    (["--student-layers", "7"], "student_layers must be in 1..4"),
    (["--alignment", "late"], "n_student must be an int in 3..4"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags(root, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    _refused(capsys, main(_train(root, out, *flags)), out, message)


@pytest.mark.parametrize("text, message", [
    ('max_steps: "ten"\n', "max_steps (--max-steps) must be an integer, got 'ten'"),
    ("logging_steps: 0\n", "logging_steps (--logging-steps) must be >= 1"),
    ("student_layers: two\n", "must be a number of layers"),
    ("progress: maybe\n", "progress (--progress) must be true or false"),
    ("per_device_train_batch_size: 1\n", "need a batch of >= 2"),  # TrainingArguments' name, checked the same
    ("batch_size: 4\nper_device_train_batch_size: 4\n", "'batch_size' twice"),
    ("temprature: 3\n", "unknown options ['temprature']"),
])
def test_bad_config_file_values_are_checked_like_flags(root, tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    args = [a for a in _train(root, out, "--config", str(path)) if a not in ("--student-layers", "2", "--no-progress")]
    _refused(capsys, main(args), out, message)


def test_config_file_uses_trainingarguments_names_and_flags_override_it(root, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_steps": 5, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                                "save_steps": 100, "logging_steps": 1}))
    out = tmp_path / "out"
    assert main(_train(root, out, "--config", str(path), "--steps", "2")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recorded = json.loads((out / "distill_config.json").read_text())
    assert summary["global_step"] == 2  # the flag (old spelling --steps) beats the file's 5
    assert recorded["batch_size"] == 4 and recorded["max_steps"] == 2


def test_teacher_and_student_of_another_kind_are_refused_before_loading(root, tmp_path, capsys):
    out = tmp_path / "out"  # a causal teacher and a masked student of the same vocabulary size
    code = main(_train(root, out, "--student", str(root / "teacher"), "--recipe", "standard")[:2]
                + [str(root / "gpt2")] + _train(root, out, "--student", str(root / "teacher"))[3:])
    _refused(capsys, code, out, "the teacher is a causal LM (GPT2LMHeadModel) but the student a masked LM")


def test_another_tokenizer_of_the_same_size_is_refused(root, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, main(_train(root, out, "--student", str(root / "other_tok"))), out,
             "the student's tokenizer differs from the teacher's")
    code = main(["eval", "--model", str(root / "other_tok"), "--eval-file", str(root / "train.txt"),
                 "--teacher", str(root / "teacher")])
    _refused(capsys, code, tmp_path / "never", "the student's tokenizer differs from the teacher's")


def test_one_token_lines_with_clm(root, tmp_path, capsys, caplog):
    """Lines of one token have no next token: counted and dropped, and an error when none is left (this
    ended in a misleading NaN error before)."""
    tok = tf.AutoTokenizer.from_pretrained(root / "gpt2_bpe")
    words = sorted({w for t in make_corpus(60, seed=4) for w in t.split() if len(tok(w)["input_ids"]) == 1})[:2]
    assert len(words) == 2  # the premise: lines of one token each
    (tmp_path / "short.txt").write_text("\n".join(words) + "\n\n")
    out = tmp_path / "out"
    args = ["train", "--teacher", str(root / "gpt2_bpe"), "--train-file", str(tmp_path / "short.txt"),
            "--output-dir", str(out), "--student-layers", "1", "--objectives", "clm,ce", "--max-steps", "1",
            "--no-progress", "--batch-size", "4"]
    _refused(capsys, main(args), out,  # before any weights load (one line: no loading progress bar)
             "every example is shorter than 2 tokens after tokenizing (a causal LM needs a next token")
    lines = words + make_corpus(8, seed=9)
    (tmp_path / "mixed.txt").write_text("\n".join(lines) + "\n")
    args[4] = str(tmp_path / "mixed.txt")
    with caplog.at_level(logging.INFO, logger="applications.distill"):
        assert main(args + ["--max-length", "6"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # oracle: the tokenizer itself, line by line
    lengths = [len(tok(t)["input_ids"]) for t in lines]
    want = {"examples": sum(n >= 2 for n in lengths), "dropped_short": sum(n < 2 for n in lengths),
            "truncated": sum(n > 6 for n in lengths)}
    assert summary["data"] == want and want["dropped_short"] == 2 and want["truncated"] > 0
    assert f"{want['dropped_short']} dropped as shorter than 2 tokens" in caplog.text
    assert f"{want['truncated']} truncated to 6 tokens" in caplog.text


def test_eval_bad_input_and_config(root, tmp_path, capsys):
    code = main(["eval", "--model", str(root / "teacher"), "--eval-file", str(root / "train.txt"),
                 "--per-device-eval-batch-size", "0"])
    _refused(capsys, code, tmp_path / "never", "must be >= 1, got 0")
    (tmp_path / "e.yaml").write_text("max_length: lots\n")
    code = main(["eval", "--model", str(root / "teacher"), "--eval-file", str(root / "train.txt"),
                 "--config", str(tmp_path / "e.yaml")])
    _refused(capsys, code, tmp_path / "never", "argument --max-length: must be an integer >= 1, got 'lots'")
    (tmp_path / "e.yaml").write_text("max_len: 8\n")
    code = main(["eval", "--model", str(root / "teacher"), "--eval-file", str(root / "train.txt"),
                 "--config", str(tmp_path / "e.yaml")])
    _refused(capsys, code, tmp_path / "never", "unknown option 'max_len'")
    (tmp_path / "e.yaml").write_text("max_length: 8\nper_device_eval_batch_size: 4\n")
    assert main(["eval", "--model", str(root / "teacher"), "--eval-file", str(root / "train.txt"),
                 "--config", str(tmp_path / "e.yaml")]) == 0
    from_file = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--model", str(root / "teacher"), "--eval-file", str(root / "train.txt"),
                 "--max-length", "8", "--batch-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == from_file


# -- TED --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ted_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ted_bad")
    rows = [(f"good film {i}", 1) if i % 2 else (f"bad plot {i}", 0) for i in range(12)]
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    tok = train_tokenizer([s for s, _ in rows], 60, causal=False)
    torch.manual_seed(0)
    for name, layers in (("teacher", 2), ("student", 1)):
        model = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=len(tok), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=16, max_position_embeddings=32, num_labels=2))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _stage2(root, out, *extra):
    return ["stage2", "--teacher", str(root / "teacher"), "--student", str(root / "student"), "--mode", "kd",
            "--train-file", str(root / "train.tsv"), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "4", *extra]


def test_ted_missing_eval_file_fails_before_training(ted_root, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, ted_cli.main(_stage2(ted_root, out, "--eval-file", str(tmp_path / "nope.tsv"))), out,
             "--eval-file")
    code = main(["ted", "finetune", "--model", str(ted_root / "student"), "--train-file",
                 str(ted_root / "train.tsv"), "--output-dir", str(out), "--eval-file", str(tmp_path / "nope.tsv")])
    _refused(capsys, code, out, "does not exist")


def test_ted_bad_output_paths_fail_before_training(ted_root, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "out"
    _refused(capsys, ted_cli.main(_stage2(ted_root, out)), out, "is a file, not a directory")
    code = main(["ted", "stage1", "--model", str(ted_root / "teacher"), "--train-file", str(ted_root / "train.tsv"),
                 "--output", str(out / "filters.pt"), "--steps", "2"])
    _refused(capsys, code, out, "cannot be created")


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "0"], "--max-steps/--steps: must be >= 1, got 0"),
    (["--steps", "two"], "must be an integer >= 1, got 'two'"),
    (["--batch-size", "0"], "must be >= 1"),
    (["--student-interval", "0"], "must be >= 1"),
    (["--learning-rate", "0"], "argument --learning-rate: must be > 0"),
    (["--temperature", "-1"], "argument --temperature: must be > 0"),
])
def test_ted_bad_flags(ted_root, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    _refused(capsys, main(["ted", *_stage2(ted_root, out, *flags)]), out, message)


def test_ted_config_file(ted_root, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "t.yaml").write_text("max_steps: two\n")
    _refused(capsys, ted_cli.main(_stage2(ted_root, out, "--config", str(tmp_path / "t.yaml"))), out,
             "must be an integer >= 1, got 'two'")
    (tmp_path / "t.yaml").write_text("max_steps: 3\nalpha_kl: 0.5\n")
    args = [a for a in _stage2(ted_root, out, "--config", str(tmp_path / "t.yaml")) if a not in ("--max-steps", "2")]
    assert ted_cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3  # from the file (the command line gave no --max-steps)


def test_ted_counts_truncated_lines_in_the_log(ted_root, tmp_path, capsys, caplog):
    tok = tf.AutoTokenizer.from_pretrained(ted_root / "teacher")
    rows = [line.split("\t")[0] for line in (ted_root / "train.tsv").read_text().splitlines()[1:]]
    want = sum(len(tok(t)["input_ids"]) > 4 for t in rows)  # oracle: the tokenizer, line by line
    assert 0 < want
    with caplog.at_level(logging.WARNING, logger="applications.distill"):
        assert ted_cli.main(_stage2(ted_root, tmp_path / "out", "--max-length", "4")) == 0
    assert f"{want} truncated to 4 tokens" in caplog.text
