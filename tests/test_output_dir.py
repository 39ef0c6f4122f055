"""Output-directory safety: no run overwrites its teacher or student, and no two runs mix in one directory."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import transformers as tf
from conftest import save_bert_teacher
from safetensors.torch import load_file
from transformers import TrainerCallback

from applications.distill.cli import main
from applications.distill.config import DistillConfig
from applications.distill.corpus import make_corpus
from applications.distill.data import train_tokenizer
from applications.distill.errors import DistillConfigError
from applications.distill.run import train
from applications.distill.ted import cli as ted_cli

tf.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny BERT teacher (with tokenizer) and a training text file."""
    root = tmp_path_factory.mktemp("outdir")
    texts = make_corpus(60, seed=5)
    (root / "train.txt").write_text("\n".join(texts) + "\n")
    save_bert_teacher(root / "teacher", texts, 100, layers=2)
    return root


def _cfg(root, out, **kw):
    base = {"teacher": str(root / "teacher"), "train_file": str(root / "train.txt"), "output_dir": str(out),
            "student_layers": 1, "batch_size": 4, "max_steps": 2, "save_steps": 1, "logging_steps": 1,
            "progress": False, "plot": False, "recipe": "standard"}
    base.update(kw)
    return DistillConfig(**base)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _argv(root, out, *extra):
    return ["train", "--teacher", str(root / "teacher"), "--train-file", str(root / "train.txt"),
            "--output-dir", str(out), "--student-layers", "1", "--max-steps", "2", "--batch-size", "4",
            "--no-progress", "--no-plot", *extra]


def test_output_dir_equal_to_the_teacher_is_refused_and_the_teacher_is_untouched(setup, capsys):
    before = _snapshot(setup / "teacher")
    # the bug: this run used to save its student over the teacher
    assert main(_argv(setup, setup / "teacher")) == 2
    assert "is the teacher's directory" in capsys.readouterr().err
    # even with --overwrite-output-dir, and spelt differently (trailing slash, '..')
    odd = f"{setup}/teacher/../teacher/"
    assert main(_argv(setup, odd, "--overwrite-output-dir")) == 2
    assert "is the teacher's directory" in capsys.readouterr().err
    assert _snapshot(setup / "teacher") == before


def test_output_dir_equal_to_the_student_is_refused(setup, tmp_path, capsys):
    student = tmp_path / "student"
    tf.BertForMaskedLM.from_pretrained(setup / "teacher").save_pretrained(student)
    before = _snapshot(student)
    assert main(_argv(setup, student, "--student", str(student))) == 2
    assert "is the student's directory" in capsys.readouterr().err
    assert _snapshot(student) == before


def test_a_second_run_into_a_used_directory_is_refused_unless_overwritten(setup, tmp_path):
    out = tmp_path / "run"
    train(_cfg(setup, out, max_steps=4, save_steps=2))
    before = _snapshot(out)
    # the bug: a second run with other options mixed into the first one's directory
    with pytest.raises(DistillConfigError, match="is not empty .*--overwrite-output-dir"):
        train(_cfg(setup, out, recipe="diito"))
    assert _snapshot(out) == before  # refused before anything was written
    summary = train(_cfg(setup, out, recipe="diito", overwrite_output_dir=True))
    assert summary["global_step"] == 2
    # the first run's checkpoints are gone: nothing of it can be resumed by mistake
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    recorded = json.loads((out / "distill_config.json").read_text())
    assert recorded["recipe"] == "diito" and recorded["max_steps"] == 2
    steps = [int(r[0]) for r in list(csv.reader((out / "log.csv").open()))[1:]]
    assert max(steps) == 2  # no row of the first (4-step) run


def test_overwrite_refused_by_a_later_check_deletes_nothing(setup, tmp_path):
    out = tmp_path / "run"
    train(_cfg(setup, out))
    before = _snapshot(out)
    with pytest.raises(DistillConfigError, match="unknown objective"):
        train(_cfg(setup, out, objectives="mlm,nonsense", overwrite_output_dir=True))
    assert _snapshot(out) == before  # the previous run is removed only once the new one is about to train


def test_resume_into_another_run_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    train(_cfg(setup, out, max_steps=2))
    with pytest.raises(DistillConfigError, match=r"other options \(recipe: 'standard' there, 'diito' now\)"):
        train(_cfg(setup, out, recipe="diito", resume="latest"))


def test_resume_and_overwrite_together_are_refused(setup, tmp_path):
    with pytest.raises(DistillConfigError, match="give one of them"):
        train(_cfg(setup, tmp_path / "o", resume="latest", overwrite_output_dir=True))


def test_resume_from_a_missing_checkpoint_is_a_clear_error(setup, tmp_path, capsys):
    assert main(_argv(setup, tmp_path / "o", "--resume", str(tmp_path / "nonexistent"))) == 2
    assert "is not a checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_latest_in_a_new_directory_starts_a_fresh_run(setup, tmp_path):
    summary = train(_cfg(setup, tmp_path / "fresh", resume="latest"))
    assert summary["global_step"] == 2


class Crash(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


def test_log_after_a_resume_has_each_step_once(setup, tmp_path):
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):  # killed after step 5 was logged; the last checkpoint is step 4
        train(_cfg(setup, out, max_steps=6, save_steps=2), callbacks=[Crash(5)])
    logged = [int(r[0]) for r in list(csv.reader((out / "log.csv").open()))[1:] if r[1] == "loss"]
    assert logged == [1, 2, 3, 4, 5]
    train(_cfg(setup, out, max_steps=6, save_steps=2, resume="latest"))  # step 5 runs again
    logged = [int(r[0]) for r in list(csv.reader((out / "log.csv").open()))[1:] if r[1] == "loss"]
    assert logged == [1, 2, 3, 4, 5, 6]  # the bug: 1, 2, 3, 4, 5, 5, 6


def test_resumed_run_keeps_the_first_runs_weights_path(setup, tmp_path):
    """`--resume latest` into its own run is allowed and gives the student of that run."""
    out = tmp_path / "run"
    train(_cfg(setup, out, max_steps=2))
    weights = load_file(str(out / "model.safetensors"))
    summary = train(_cfg(setup, out, max_steps=2, resume="latest"))  # finished: restored, not retrained
    assert summary["global_step"] == 2
    again = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)


# -- TED ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cls_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ted_out")
    rows = [("good film", 1), ("bad plot", 0), ("great cast", 1), ("dull movie", 0)] * 3
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    tok = train_tokenizer([s for s, _ in rows], 40, causal=False)
    for name, layers in (("teacher", 2), ("student", 1)):
        torch.manual_seed(layers)
        model = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=len(tok), hidden_size=8, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=16, max_position_embeddings=32, num_labels=2))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("target", ["teacher", "student"])
def test_ted_stage2_into_a_source_directory_is_refused(cls_models, target, capsys):
    before = _snapshot(cls_models / target)
    rc = ted_cli.main(["stage2", "--mode", "kd", "--teacher", str(cls_models / "teacher"),
                       "--student", str(cls_models / "student"), "--train-file", str(cls_models / "train.tsv"),
                       "--output-dir", str(cls_models / target), "--steps", "1", "--batch-size", "2"])
    assert rc == 2 and f"is the {target}'s directory" in capsys.readouterr().err
    assert _snapshot(cls_models / target) == before


def test_ted_finetune_into_its_model_and_into_a_used_directory(cls_models, tmp_path, capsys):
    common = ["finetune", "--model", str(cls_models / "teacher"), "--train-file", str(cls_models / "train.tsv"),
              "--steps", "1", "--batch-size", "2"]
    assert ted_cli.main([*common, "--output-dir", str(cls_models / "teacher")]) == 2
    assert "is the model's directory" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("keep me")
    assert ted_cli.main([*common, "--output-dir", str(used)]) == 2
    assert "is not empty (notes.txt)" in capsys.readouterr().err
    assert ted_cli.main([*common, "--output-dir", str(used), "--overwrite-output-dir"]) == 0
    assert (used / "notes.txt").read_text() == "keep me"  # overwriting removes run artefacts only
    assert (used / "config.json").is_file()


def test_ted_stage1_does_not_overwrite_a_filter_file(cls_models, tmp_path, capsys):
    target = tmp_path / "f.pt"
    target.write_bytes(b"precious")
    rc = ted_cli.main(["stage1", "--model", str(cls_models / "teacher"), "--train-file",
                       str(cls_models / "train.tsv"), "--output", str(target), "--steps", "1", "--batch-size", "2"])
    assert rc == 2 and "exists" in capsys.readouterr().err
    assert target.read_bytes() == b"precious"
