"""Every method on the device the Trainer picks: train (DIITO + ATKD), TED stage 1 + 2 and eval run on
`cuda` when it is available and on the CPU always; and no step reads a tensor back to the host in the
project's code except the one non-finite check per optimizer step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import save_bert_teacher

from applications.distill.cli import main
from applications.distill.config import DistillConfig
from applications.distill.corpus import make_corpus
from applications.distill.data import train_tokenizer
from applications.distill.objectives.ted import TEDConfig
from applications.distill.run import train
from applications.distill.ted import stages as tt

tf.logging.set_verbosity_error()

DEVICES = ["cpu", "cuda"]
_ROOT = Path(__file__).resolve().parents[1]
_OURS = (str(_ROOT / "applications" / "distill"), str(_ROOT / "interventions"))


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The device the run must land on; on 'cpu' the Trainer is kept off any GPU."""
    if request.param == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device here: the cuda half of this test runs only on a GPU machine"
        print(f"SKIPPED (cuda): {reason}", file=sys.stderr)
        pytest.skip(reason)
    if request.param == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return torch.device(request.param)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_lm")
    texts = make_corpus(60, seed=4)
    (root / "train.txt").write_text("\n".join(texts[:48]) + "\n")
    (root / "eval.txt").write_text("\n".join(texts[48:]) + "\n")
    save_bert_teacher(root / "teacher", texts, 100)
    return root


class _OnDevice(tf.TrainerCallback):
    """Records where the student's parameters and the trainer's batches live during training."""

    def __init__(self):
        self.devices = set()

    def on_step_end(self, args, state, control, model=None, **kw):
        self.devices |= {p.device.type for p in model.parameters()}


@pytest.mark.parametrize("objectives", ["mlm,ce,cos,diito", "mlm,atkd"])
def test_train_and_eval_run_on_the_device(lm, tmp_path, device, objectives, capsys):
    seen = _OnDevice()
    teacher = tf.BertForMaskedLM.from_pretrained(lm / "teacher")
    cfg = DistillConfig(teacher=str(lm / "teacher"), train_file=str(lm / "train.txt"),
                        eval_file=str(lm / "eval.txt"), eval_steps=2, output_dir=str(tmp_path / "o"),
                        student_layers=2, batch_size=4, max_steps=3, save_steps=100, logging_steps=1,
                        progress=False, plot=False, objectives=objectives)
    summary = train(cfg, teacher=teacher, callbacks=[seen])
    assert seen.devices == {device.type}
    assert {p.device.type for p in teacher.parameters()} == {device.type}  # the teacher sits with the student
    assert summary["global_step"] == 3 and 0 <= summary["eval"]["iia"] <= 1
    keys = {line.split(",")[1] for line in (tmp_path / "o" / "log.csv").read_text().splitlines()[1:]}
    assert "eval_loss" in keys  # the periodic evaluation ran (on the device, through Trainer.evaluate)
    if device.type == "cuda":  # the eval command on the device: the saved student, moved there
        code = main(["eval", "--model", str(tmp_path / "o"), "--eval-file", str(lm / "eval.txt"),
                     "--teacher", str(lm / "teacher")])
        assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] > 1


def _ted_models(vocab: int):
    torch.manual_seed(0)

    def bert(layers, hidden):
        return tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2))

    return bert(4, 16), bert(2, 8)


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_cls")
    rows = [(s, i % 2) for i, s in enumerate(make_corpus(24, seed=2))]
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    tok = train_tokenizer([s for s, _ in rows], 80, causal=False)
    return tok, tt.task_data(str(root / "train.tsv"), tok, "classification", 16, 2)


def test_ted_stages_run_on_the_device(cls_data, device):
    tok, data = cls_data
    teacher, student = _ted_models(len(tok))
    opts = tt.LoopOptions(steps=2, batch_size=4, eval_steps=1)
    t_f, _ = tt.stage1(teacher, data, interval=2, options=opts)
    s_f, _ = tt.stage1(student, data, interval=1, width=16, options=opts)
    assert {p.device.type for p in t_f.parameters()} == {device.type}
    _, log = tt.stage2(TEDConfig(mode="ted"), teacher, student, data, opts, t_f, s_f, eval_data=data)
    for module in (teacher, student, t_f, s_f):
        assert {p.device.type for p in module.parameters()} == {device.type}
    assert len(log) == 2 and set(log[0]) == {"loss", "task", "kl", "mse"}
    assert 0 <= tt.evaluate(student, data)["accuracy"] <= 1


# -- host reads per step -------------------------------------------------------------------------
_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class _Reads(tf.TrainerCallback):
    """Tensor -> host reads whose caller is the project's code, between the first step's start and the
    last step's end (the library's own reads, and set-up and summary work, are not counted)."""

    def __init__(self):
        self.calls: list[str] = []
        self.active = False

    def on_step_begin(self, args, state, control, **kw):
        self.active = True

    def on_train_end(self, args, state, control, **kw):
        self.active = False


@pytest.fixture
def host_reads(monkeypatch):
    reads = _Reads()
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            if reads.active:
                frame = sys._getframe(1)
                if frame.f_code.co_filename.startswith(_OURS):
                    reads.calls.append(f"{_name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def _split(calls):
    """(the non-finite checks, every other read)."""
    checks = [c for c in calls if "trainer.py" in c and "__bool__" in c]
    return checks, [c for c in calls if c not in checks]


@pytest.mark.parametrize("device", ["cpu"], indirect=True)
def test_a_training_step_reads_the_device_once(lm, tmp_path, device, host_reads):
    # Fails on the old step code: inputs went to the CPU for masking (.cpu()), every loss component was
    # read with float() each step, the masks were read back for span lengths (.tolist()), ATKD read its
    # statistics, and the loss was checked twice (our guard and the Trainer's logging_nan_inf_filter).
    steps = 4
    cfg = DistillConfig(teacher=str(lm / "teacher"), train_file=str(lm / "train.txt"), output_dir=str(tmp_path / "o"),
                        student_layers=2, batch_size=4, grad_accum=2, max_steps=steps, save_steps=100,
                        logging_steps=100, progress=False, plot=False, objectives="mlm,ce,cos,diito,diito_cos,atkd")
    train(cfg, callbacks=[host_reads])
    checks, others = _split(host_reads.calls)
    assert len(checks) == steps, checks  # the non-finite check, once per optimizer step (not per micro-batch)
    assert others == []


@pytest.mark.parametrize("device", ["cpu"], indirect=True)
def test_a_ted_stage2_step_reads_the_device_once(cls_data, device, host_reads):
    # Fails on the old loop: it read every loss part with float() and checked the loss each step, and
    # the MSE read its mask sum back to refuse empty masks.
    tok, data = cls_data
    teacher, student = _ted_models(len(tok))
    opts = tt.LoopOptions(steps=3, batch_size=4, logging_steps=100)
    t_f, _ = tt.stage1(teacher, data, interval=2, options=opts)
    s_f, _ = tt.stage1(student, data, interval=1, width=16, options=opts)
    tt.stage2(TEDConfig(mode="ted"), teacher, student, data, opts, t_f, s_f, callbacks=[host_reads])
    checks, others = _split(host_reads.calls)
    assert len(checks) == 3, checks
    assert others == []


@pytest.mark.parametrize("device", ["cpu"], indirect=True)
def test_bf16_fp16_and_teacher_dtype_are_accepted_on_the_cpu(lm, tmp_path, device):
    """--bf16 (and --fp16, which a CPU runs as bf16 autocast) train with a bfloat16 teacher; the student's
    weights stay float32 and move."""
    for flag in ("bf16", "fp16"):
        teacher = tf.BertForMaskedLM.from_pretrained(lm / "teacher")
        cfg = DistillConfig(teacher=str(lm / "teacher"), train_file=str(lm / "train.txt"),
                            output_dir=str(tmp_path / flag), student_layers=2, batch_size=4, max_steps=2,
                            save_steps=100, logging_steps=1, progress=False, plot=False, objectives="mlm,ce,cos,diito",
                            teacher_dtype="bfloat16", **{flag: True})
        summary = train(cfg, teacher=teacher)
        assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
        student = tf.BertForMaskedLM.from_pretrained(tmp_path / flag)
        assert {p.dtype for p in student.parameters()} == {torch.float32}
        assert summary["global_step"] == 2 and torch.isfinite(torch.tensor(summary["train_loss"]))
    tok, data = _cls_data_for_dtype(tmp_path)
    teacher, student = _ted_models(len(tok))
    opts = tt.LoopOptions(steps=2, batch_size=4, bf16=True, teacher_dtype="bfloat16")
    _, log = tt.stage2(TEDConfig(mode="kd"), teacher, student, data, opts)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16} and len(log) == 2
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)


def _cls_data_for_dtype(root):
    rows = [(s, i % 2) for i, s in enumerate(make_corpus(16, seed=3))]
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    tok = train_tokenizer([s for s, _ in rows], 80, causal=False)
    return tok, tt.task_data(str(root / "train.tsv"), tok, "classification", 16, 2)
