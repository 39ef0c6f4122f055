"""Training learns, for every method on the one trainer: the loss falls over a few dozen steps, a KD
student ends closer to its teacher than it started; a resumed DIITO or TED stage-2 run is bit-equal to
the uninterrupted one."""

from __future__ import annotations

import csv
import statistics

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from applications.distill.config import DistillConfig
from applications.distill.corpus import make_corpus
from applications.distill.data import train_tokenizer, word_tokenizer
from applications.distill.objectives.ted import TEDConfig
from applications.distill.run import pretrain, train
from applications.distill.student import build_student
from applications.distill.ted import stages as tt

tf.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A BERT teacher pretrained a little on the grammar corpus (so it has something to teach)."""
    root = tmp_path_factory.mktemp("learns")
    texts = make_corpus(160, seed=7)
    (root / "train.txt").write_text("\n".join(texts) + "\n")
    tok = train_tokenizer(texts, 90, causal=False)
    torch.manual_seed(0)
    teacher = tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    pretrain(teacher, tok, texts, DistillConfig(output_dir=str(root / "teacher"), max_steps=60, batch_size=16,
                                                learning_rate=1e-2, logging_steps=1, progress=False, plot=False,
                                                save_steps=1000))
    return root, tok, texts


def _losses(folder, key="loss") -> list[float]:
    with (folder / "log.csv").open() as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["key"] == key]


def _falls(losses, k=5, factor=0.9):
    """The mean of the last k logged losses is below `factor` times the mean of the first k."""
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    return last < factor * first, (first, last)


def test_pretraining_loss_falls(lm):
    root, _, _ = lm
    ok, seen = _falls(_losses(root / "teacher"), factor=0.95)
    assert ok, seen


def _kl_to_teacher(student, teacher, tok, texts) -> float:
    """Mean KL(teacher || student) over every real token of fixed sentences (no masking)."""
    batch = tok(texts[:32], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        t = torch.log_softmax(teacher(**batch).logits, -1)
        s = torch.log_softmax(student(**batch).logits, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = batch["attention_mask"].bool()
    return float(kl[m].mean())


@pytest.mark.parametrize("objectives", ["ce", "mlm,ce,cos,diito", "ce,cos,diito,diito_cos", "atkd", "atkd_reverse"])
def test_distillation_loss_falls(lm, tmp_path, objectives):
    root, tok, texts = lm
    out = tmp_path / "s"
    torch.manual_seed(1)
    student = tf.BertForMaskedLM(tf.BertConfig.from_pretrained(root / "teacher", num_hidden_layers=2))
    student.save_pretrained(tmp_path / "init")  # a fresh (not teacher-copied) student: far from the teacher
    train(DistillConfig(teacher=str(root / "teacher"), student=str(tmp_path / "init"), train_file=str(root / "train.txt"),
                        output_dir=str(out), objectives=objectives, batch_size=8, max_steps=30, learning_rate=3e-3,
                        warmup_ratio=0.0, logging_steps=1, save_steps=1000, progress=False, plot=False))
    ok, seen = _falls(_losses(out))
    assert ok, (objectives, seen)
    if objectives == "ce":  # KD: the student's distributions end closer to the teacher's
        teacher = tf.BertForMaskedLM.from_pretrained(root / "teacher")
        before = _kl_to_teacher(tf.BertForMaskedLM.from_pretrained(tmp_path / "init"), teacher, tok, texts)
        after = _kl_to_teacher(tf.BertForMaskedLM.from_pretrained(out), teacher, tok, texts)
        assert after < 0.8 * before, (before, after)


class _Kill(tf.TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


def test_diito_resume_is_bit_equal(lm, tmp_path):
    root, _, _ = lm
    kw = {"teacher": str(root / "teacher"), "train_file": str(root / "train.txt"), "student_layers": 2,
          "batch_size": 4, "grad_accum": 2, "max_steps": 6, "save_steps": 3, "logging_steps": 1, "progress": False,
          "plot": False}
    train(DistillConfig(output_dir=str(tmp_path / "whole"), **kw))
    with pytest.raises(KeyboardInterrupt):
        train(DistillConfig(output_dir=str(tmp_path / "cut"), **kw), callbacks=[_Kill(4)])
    train(DistillConfig(output_dir=str(tmp_path / "cut"), resume="latest", **kw))
    whole, resumed = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # bit-equal, not merely close


# -- TED ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    """A learnable classification task: is the subject plural? (the verb agrees with it)."""
    root = tmp_path_factory.mktemp("learns_cls")
    plural, singular = ("some", "these", "those", "many", "two"), ("a", "this", "that", "every")
    texts = [t for t in make_corpus(160, seed=9) if t.split()[0] in plural + singular][:96]
    rows = [(t, int(t.split()[0] in plural)) for t in texts]
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    tok = word_tokenizer(texts)
    data = tt.task_data(str(root / "train.tsv"), tok, "classification", 24, 2)

    def bert(layers, hidden, seed):
        torch.manual_seed(seed)
        return tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))

    teacher = bert(4, 32, 0)
    log = tt.finetune(teacher, data, tt.LoopOptions(steps=40, batch_size=16, learning_rate=3e-3))
    return root, data, teacher, bert, log


def test_finetune_loss_falls(cls):
    *_, log = cls
    ok, seen = _falls(log)
    assert ok, seen


def _stage1(cls):
    _, data, teacher, _, _ = cls
    t_f, t_log = tt.stage1(teacher, data, interval=2, options=tt.LoopOptions(steps=30, batch_size=16, learning_rate=1e-2))
    # The student: teacher blocks 0 and 2 (DistilBERT-style), so that its features carry the task.
    student = build_student(teacher, [0, 2])
    s_f, s_log = tt.stage1(student, data, interval=1, options=tt.LoopOptions(steps=30, batch_size=16,
                                                                             learning_rate=1e-2))
    return student, t_f, s_f, t_log, s_log


def test_stage1_loss_falls(cls):
    *_, t_log, s_log = _stage1(cls)
    for log in (t_log, s_log):
        ok, seen = _falls(log)
        assert ok, seen


@pytest.mark.parametrize("mode", ["ted", "kd", "lwd"])
def test_stage2_loss_falls(cls, mode):
    _, data, teacher, _, _ = cls
    student, t_f, s_f, *_ = _stage1(cls)
    _, log = tt.stage2(TEDConfig(mode=mode, alpha_mse=10.0), teacher, student, data,
                       tt.LoopOptions(steps=40, batch_size=16, learning_rate=5e-3),
                       t_f if mode == "ted" else None, s_f if mode == "ted" else None)
    ok, seen = _falls([e["loss"] for e in log])
    assert ok, (mode, seen)


def test_ted_stage2_resume_is_bit_equal(cls, tmp_path):
    _, data, teacher, _, _ = cls
    student, t_f, s_f, *_ = _stage1(cls)
    init = {k: v.clone() for k, v in student.state_dict().items()}

    def run(out, resume=None, callbacks=()):
        student.load_state_dict(init)
        filters = tt.TEDFilters(s_f.layers, 32, 32, "linear", "classification", 2)
        filters.load_state_dict(s_f.state_dict())
        opts = tt.LoopOptions(steps=6, batch_size=8, grad_accum=2, save_steps=3, output_dir=str(out), resume=resume,
                              plot=False)
        trained, _ = tt.stage2(TEDConfig(mode="ted", alpha_mse=10.0), teacher, student, data, opts, t_f, filters,
                               callbacks=callbacks)
        return {k: v.clone() for k, v in student.state_dict().items()}, \
            {k: v.clone() for k, v in trained.filters.state_dict().items()}

    whole, whole_f = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callbacks=[_Kill(4)])
    resumed, resumed_f = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert any(not torch.equal(whole[k], init[k]) for k in init)  # training moved the weights
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert all(torch.equal(resumed_f[k], whole_f[k]) for k in whole_f)  # the student's filters resume too
