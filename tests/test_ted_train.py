"""TED end to end on tiny models saved with save_pretrained: both stages, the baselines, export, bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as tf

from applications.distill.data import train_tokenizer
from applications.distill.objectives.ted import TEDConfig
from applications.distill.ted import cli as ted_cli
from applications.distill.ted import stages as tt
from interventions import InterventionError

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull", "fun", "sad", "movie", "film", "plot", "cast"]


def _sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(len(WORDS), (5,), generator=g).tolist()
        words = [WORDS[i] for i in idx]
        out.append((" ".join(words), int(idx[0] % 2 == 0)))
    return out


def _bert(layers: int, hidden: int, vocab: int, seed: int):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.BertForSequenceClassification(cfg)


def _gpt(layers: int, hidden: int, vocab: int, seed: int):
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_inner=2 * hidden, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def cls_setup(tmp_path_factory):
    """A 4-layer width-16 BERT teacher, a 2-layer width-8 student (one tokenizer), a tsv train file."""
    root = tmp_path_factory.mktemp("ted_cls")
    rows = _sentences(24)
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    tok = train_tokenizer([s for s, _ in rows], 60, causal=False)
    vocab = len(tok)
    for name, model in (("teacher", _bert(4, 16, vocab, 0)), ("student", _bert(2, 8, vocab, 1))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ted_lm")
    lines = [s for s, _ in _sentences(24, seed=3)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    tok = train_tokenizer(lines, 300, causal=True)
    vocab = len(tok)
    for name, model in (("teacher", _gpt(4, 16, vocab, 0)), ("student", _gpt(2, 16, vocab, 1))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _loop(*extra):
    return ["--batch-size", "4", "--max-length", "12", "--seed", "0", *extra]


def _plain_keys(model_cls, path) -> tuple[set, set]:
    """Keys of the saved student and of a fresh model of its config (the oracle of a 'plain HF model')."""
    loaded = model_cls.from_pretrained(path)
    fresh = model_cls.from_config(tf.AutoConfig.from_pretrained(path))
    return set(loaded.state_dict()), set(fresh.state_dict())


def test_ted_all_classification_exports_a_plain_student(cls_setup, tmp_path, capsys):
    out = tmp_path / "run"
    before = _state(tf.AutoModelForSequenceClassification.from_pretrained(cls_setup / "student"))
    rc = ted_cli.main(["all", "--teacher", str(cls_setup / "teacher"), "--student", str(cls_setup / "student"),
                       "--train-file", str(cls_setup / "train.tsv"), "--output-dir", str(out),
                       "--teacher-interval", "2", "--student-interval", "1", "--stage1-steps", "3",
                       "--steps", "3", "--eval-file", str(cls_setup / "train.tsv"), *_loop()])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert summary["teacher_stage1"]["layers"] == [1, 3] and summary["student_stage1"]["layers"] == [0, 1]
    t_f = tt.load_filters(out / "teacher_filters.pt")
    s_f = tt.load_filters(out / "student_filters.pt")
    # width defaults to the teacher's hidden size (16) on both sides; the student's filters read width 8
    assert tuple(t_f.filters[0].weight.shape) == (16, 16) and tuple(s_f.filters[0].weight.shape) == (16, 8)
    saved, fresh = _plain_keys(tf.AutoModelForSequenceClassification, out / "student")
    assert saved == fresh and not any("filter" in k or "heads" in k for k in saved)
    after = tf.AutoModelForSequenceClassification.from_pretrained(out / "student").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student did train
    # The reported accuracy is the exported student's, recomputed here one unpadded sentence at a time (the
    # old `0 <= accuracy <= 1` held for any number: evaluating the student before training, batches without
    # their attention mask, or labels read from the wrong column would all have passed).
    exported = tf.AutoModelForSequenceClassification.from_pretrained(out / "student").eval()
    tok = tf.AutoTokenizer.from_pretrained(out / "student")
    rows = [line.split("\t") for line in (cls_setup / "train.tsv").read_text().splitlines()[1:]]
    with torch.no_grad():
        right = sum(int(exported(**tok(text, truncation=True, max_length=12, return_tensors="pt")).logits.argmax(-1))
                    == int(label) for text, label in rows)
    assert summary["stage2"]["eval"]["examples"] == len(rows) == 24
    assert summary["stage2"]["eval"]["accuracy"] == right / len(rows)
    assert not list((out / "student").glob("*.pt"))  # no filter file beside the exported model


def test_stage1_freezes_the_model_and_stage2_freezes_the_teachers_filters(cls_setup):
    teacher = tt.load_model(str(cls_setup / "teacher"))
    student = tt.load_model(str(cls_setup / "student"))
    tok = tf.AutoTokenizer.from_pretrained(cls_setup / "teacher")
    data = tt.task_data(str(cls_setup / "train.tsv"), tok, "classification", 12, 2)
    opts = tt.LoopOptions(steps=3, batch_size=4, learning_rate=1e-2)
    t_weights = _state(teacher)
    t_filters, _ = tt.stage1(teacher, data, interval=2, options=opts)
    assert all(torch.equal(t_weights[k], v) for k, v in teacher.state_dict().items())  # model frozen in stage 1
    s_weights = _state(student)
    s_filters, _ = tt.stage1(student, data, interval=1, width=16, options=opts)
    assert all(torch.equal(s_weights[k], v) for k, v in student.state_dict().items())
    t_filter_weights, s_filter_weights = _state(t_filters), _state(s_filters)
    s_filters_out, log = tt.stage2(TEDConfig(mode="ted", alpha_mse=10.0), teacher, student, data, opts,
                                   t_filters, s_filters)
    assert len(log) == 3 and set(log[0]) == {"loss", "task", "kl", "mse"}
    assert all(torch.equal(t_filter_weights[k], v) for k, v in t_filters.state_dict().items())
    assert all(torch.equal(t_weights[k], v) for k, v in teacher.state_dict().items())
    changed = [k for k, v in s_filters_out.state_dict().items() if not torch.equal(s_filter_weights[k], v)]
    assert any(k.startswith("filters.") for k in changed)  # the student's filters train in stage 2
    assert not any(k.startswith("heads.") for k in changed)  # the heads take no part in stage 2
    assert any(not torch.equal(s_weights[k], v) for k, v in student.state_dict().items())


def test_language_modelling_ted_kd_and_lwd(lm_setup, tmp_path, capsys):
    common = ["--teacher", str(lm_setup / "teacher"), "--student", str(lm_setup / "student"),
              "--train-file", str(lm_setup / "train.txt"), *_loop("--steps", "2")]
    rc = ted_cli.main(["all", *common, "--output-dir", str(tmp_path / "ted"), "--stage1-steps", "2",
                       "--filter", "mlp", "--eval-file", str(lm_setup / "train.txt")])
    ted = json.loads(capsys.readouterr().out)
    assert rc == 0 and ted["stage2"]["task"] == "lm" and set(ted["stage2"]["last"]) == {"loss", "task", "kl", "mse"}
    assert ted["stage2"]["eval"]["perplexity"] > 1.0
    for mode, parts in (("kd", {"loss", "task", "kl"}), ("lwd", {"loss", "task", "kl", "mse"})):
        rc = ted_cli.main(["stage2", *common, "--mode", mode, "--output-dir", str(tmp_path / mode)])
        summary = json.loads(capsys.readouterr().out)
        assert rc == 0 and set(summary["last"]) == parts
    for run in ("ted/student", "kd", "lwd"):
        saved, fresh = _plain_keys(tf.AutoModelForCausalLM, tmp_path / run)
        assert saved == fresh and not any("filter" in k for k in saved)


def test_stage2_without_stage1_filter_file_is_refused(cls_setup, tmp_path, capsys):
    out = tmp_path / "never"
    rc = ted_cli.main(["stage2", "--teacher", str(cls_setup / "teacher"), "--student", str(cls_setup / "student"),
                       "--train-file", str(cls_setup / "train.tsv"), "--output-dir", str(out),
                       "--teacher-filters", str(tmp_path / "missing.pt"),
                       "--student-filters", str(tmp_path / "missing2.pt"), *_loop("--steps", "1")])
    err = capsys.readouterr().err
    assert rc == 2 and "teacher's stage-1 filter file" in err and "does not exist" in err and "ted stage1" in err
    assert not out.exists()  # refused before anything was trained or written
    with pytest.raises(InterventionError, match="stage-1 filters"):
        tt.stage2(TEDConfig(mode="ted"), tt.load_model(str(cls_setup / "teacher")),
                  tt.load_model(str(cls_setup / "student")), None)


def test_interval_that_does_not_divide_the_layers_is_refused(cls_setup, tmp_path, capsys):
    rc = ted_cli.main(["stage1", "--model", str(cls_setup / "teacher"), "--train-file", str(cls_setup / "train.tsv"),
                       "--output", str(tmp_path / "f.pt"), "--interval", "3", *_loop("--steps", "1")])
    assert rc == 2 and "does not divide the model's 4 layers (valid intervals: [1, 2, 4])" in capsys.readouterr().err
    assert not (tmp_path / "f.pt").exists()


def test_filters_of_another_model_or_unequal_counts_are_refused(cls_setup, tmp_path):
    teacher = tt.load_model(str(cls_setup / "teacher"))
    student = tt.load_model(str(cls_setup / "student"))
    tok = tf.AutoTokenizer.from_pretrained(cls_setup / "teacher")
    data = tt.task_data(str(cls_setup / "train.tsv"), tok, "classification", 12, 2)
    opts = tt.LoopOptions(steps=1, batch_size=4)
    t4, _ = tt.stage1(teacher, data, interval=1, options=opts)  # 4 filters
    tt.save_filters(t4, tmp_path / "t.pt", teacher)
    s2, _ = tt.stage1(student, data, interval=1, width=16, options=opts)  # 2 filters
    tt.save_filters(s2, tmp_path / "s.pt", student)
    t_f, s_f = tt.load_filters(tmp_path / "t.pt"), tt.load_filters(tmp_path / "s.pt")
    with pytest.raises(InterventionError, match="teacher has 4 filters .* but the student 2"):
        tt.stage2(TEDConfig(), teacher, student, data, opts, t_f, s_f)
    with pytest.raises(InterventionError, match="trained for a 2-layer model of hidden size 8"):
        tt.stage2(TEDConfig(), teacher, student, data, opts, s_f, s_f)  # the student's filters as the teacher's
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InterventionError, match="not a TED stage-1 filter file"):
        tt.load_filters(tmp_path / "junk.pt")


@pytest.mark.parametrize("content, message", [
    ("sentence\tlabel\ngood movie\t7\n", r"label 7 outside the model's classes \(valid: 0..1\)"),
    ("sentence\tlabel\ngood movie\tpositive\n", "is not an integer class id"),
    ("sentence\tlabel\njust a sentence\n", "expected 'sentence<TAB>label'"),
    ("sentence\tlabel\n", "holds no examples"),
])
def test_bad_tsv_is_refused(cls_setup, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.tsv"
    bad.write_text(content)
    rc = ted_cli.main(["stage1", "--model", str(cls_setup / "teacher"), "--train-file", str(bad),
                       "--output", str(tmp_path / "f.pt"), *_loop("--steps", "1")])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err


def test_causal_classifier_and_masked_lm_are_refused(tmp_path):
    gpt_cls = tf.GPT2ForSequenceClassification(tf.GPT2Config(vocab_size=20, n_embd=8, n_layer=2, n_head=2,
                                                              n_positions=16, num_labels=2, pad_token_id=0))
    data = tt.TaskData([[1, 2, 3]], [0], 0, "classification")
    with pytest.raises(InterventionError, match="pools the first token"):
        tt.stage1(gpt_cls, data, interval=1, options=tt.LoopOptions(steps=1, batch_size=1))
    mlm = tf.BertForMaskedLM(tf.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=8))
    with pytest.raises(InterventionError, match="needs a sequence classifier"):
        tt.task_of(mlm)


def test_finetune_command_trains_and_saves_a_plain_model(cls_setup, tmp_path, capsys):
    before = _state(tf.AutoModelForSequenceClassification.from_pretrained(cls_setup / "teacher"))
    rc = ted_cli.main(["finetune", "--model", str(cls_setup / "teacher"), "--train-file", str(cls_setup / "train.tsv"),
                       "--output-dir", str(tmp_path / "ft"), "--eval-file", str(cls_setup / "train.tsv"),
                       *_loop("--steps", "3")])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["steps"] == 3 and summary["eval"]["examples"] == 24
    saved, fresh = _plain_keys(tf.AutoModelForSequenceClassification, tmp_path / "ft")
    assert saved == fresh
    after = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "ft")("good movie")["input_ids"]


def test_the_main_cli_has_the_ted_command(cls_setup, tmp_path, capsys):
    from applications.distill.cli import main

    rc = main(["ted", "stage1", "--model", str(cls_setup / "teacher"), "--train-file", str(cls_setup / "train.tsv"),
               "--output", str(tmp_path / "f.pt"), "--interval", "4", *_loop("--steps", "1")])
    assert rc == 0 and json.loads(capsys.readouterr().out)["layers"] == [3]
    assert tt.load_filters(tmp_path / "f.pt").layers == [3]
    rc = main(["ted", "stage2", "--teacher", str(cls_setup / "teacher"), "--student", str(cls_setup / "student"),
               "--train-file", str(cls_setup / "train.tsv"), "--output-dir", str(tmp_path / "s"),
               "--student-filters", str(tmp_path / "f.pt"), *_loop("--steps", "1")])  # no teacher filters given
    assert rc == 2 and "needs the teacher's stage-1 filter file: pass --teacher-filters" in capsys.readouterr().err


def test_ted_stages_get_the_trainers_logs_checkpoints_and_resume(cls_setup, tmp_path, capsys):
    """Stage 1 and stage 2 run on the one trainer: log.csv, TensorBoard and the loss curve beside their
    outputs, checkpoints with --save-steps, and --resume-from-checkpoint continues a stage-2 run."""
    rc = ted_cli.main(["stage1", "--model", str(cls_setup / "teacher"), "--train-file", str(cls_setup / "train.tsv"),
                       "--output", str(tmp_path / "f.pt"), "--interval", "4", *_loop("--steps", "2")])
    assert rc == 0 and json.loads(capsys.readouterr().out)["layers"] == [3]
    for name in ("log.csv", "loss_curve.png"):
        assert (tmp_path / "f_logs" / name).is_file(), name
    assert list((tmp_path / "f_logs").glob("runs/*/events.out.tfevents.*"))
    common = ["stage2", "--mode", "kd", "--teacher", str(cls_setup / "teacher"), "--student",
              str(cls_setup / "student"), "--train-file", str(cls_setup / "train.tsv"), "--output-dir",
              str(tmp_path / "s"), "--save-steps", "2", "--gradient-accumulation-steps", "2", *_loop("--steps", "4")]
    assert ted_cli.main(common) == 0
    first = json.loads(capsys.readouterr().out)
    assert (tmp_path / "s" / "checkpoint-2").is_dir() and (tmp_path / "s" / "loss_curve.png").is_file()
    steps = [line.split(",")[0] for line in (tmp_path / "s" / "log.csv").read_text().splitlines()[1:]
             if line.split(",")[1] == "loss"]
    assert steps == ["1", "2", "3", "4"]
    assert ted_cli.main([*common, "--resume-from-checkpoint", str(tmp_path / "s" / "checkpoint-2")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["steps"] == 4 and again["first"] == first["first"]  # the run's log, restored from the checkpoint
    assert again["last"] == first["last"]  # steps 3 and 4 again, from checkpoint-2: the same losses
    steps = [line.split(",")[0] for line in (tmp_path / "s" / "log.csv").read_text().splitlines()[1:]
             if line.split(",")[1] == "loss"]
    assert steps == ["1", "2", "3", "4"]  # each step once in log.csv after the resume
