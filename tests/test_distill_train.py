"""Training end to end on tiny models: the CLI, exact resume, causal teachers, and every bad input."""

import json
import math

import pytest
import torch
import transformers as tf
from conftest import save_bert_teacher
from safetensors.torch import load_file
from transformers import TrainerCallback

from applications.distill.cli import main
from applications.distill.config import DistillConfig
from applications.distill.corpus import make_corpus
from applications.distill.errors import DataError, NonFiniteLossError
from applications.distill.run import train

tf.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny BERT teacher with its tokenizer, and train / eval text files."""
    root = tmp_path_factory.mktemp("distill")
    texts = make_corpus(120, seed=3)
    (root / "train.txt").write_text("\n".join(texts[:100]) + "\n")
    (root / "eval.txt").write_text("\n".join(texts[100:]) + "\n")
    save_bert_teacher(root / "teacher", texts, 120)
    return root


def _cfg(root, out, **kw):
    base = {"teacher": str(root / "teacher"), "train_file": str(root / "train.txt"), "output_dir": str(out),
            "student_layers": 2, "batch_size": 4, "max_steps": 4, "save_steps": 2, "logging_steps": 1,
            "progress": False}
    base.update(kw)
    return DistillConfig(**base)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_cli_train_then_eval(setup, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--teacher", str(setup / "teacher"), "--train-file", str(setup / "train.txt"),
                 "--eval-file", str(setup / "eval.txt"), "--student-layers", "2", "--objectives",
                 "mlm,ce,cos,diito", "--alignment", "full", "--max-steps", "4", "--output-dir", str(out),
                 "--batch-size", "4", "--save-steps", "2", "--logging-steps", "1", "--no-progress", "--seed", "7"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["global_step"] == 4 and summary["objectives"] == {k: 0.25 for k in ("mlm", "ce", "cos", "diito")}
    # Every eval line with room for a span (ceil(1 / 0.3) = 4 tokens) is scored, counted with the tokenizer
    # itself (the old `0 <= iia <= 1` held for any result, e.g. an evaluation that skipped or repeated lines).
    tok = tf.AutoTokenizer.from_pretrained(setup / "teacher")
    lines = (setup / "eval.txt").read_text().split("\n")
    assert summary["eval"]["examples"] == sum(len(tok(t)["input_ids"]) >= 4 for t in lines if t.strip()) > 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "log.csv", "loss_curve.png",
                 "checkpoint-2", "checkpoint-4"):
        assert (out / name).exists(), name
    assert list(out.glob("runs/*/events.out.tfevents.*")), "no TensorBoard log"
    keys = {line.split(",")[1] for line in (out / "log.csv").read_text().splitlines()[1:]}
    assert {"loss", "loss_mlm", "loss_ce", "loss_cos", "loss_diito"} <= keys
    student = tf.AutoModelForMaskedLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    assert main(["eval", "--model", str(out), "--eval-file", str(setup / "eval.txt"),
                 "--teacher", str(setup / "teacher")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # `eval` of the saved student gives summary.json's numbers exactly: evaluation masks and spans come from
    # the fixed evaluation seed, not the training seed (7 here). Fails when they follow the training seed.
    assert result == summary["eval"]
    # A model against itself: every interchange hits both alike, so IIA is exactly 1 and the perplexities are
    # equal. Fails when the two sides get different plans, layers or masks, or compare other positions.
    assert main(["eval", "--model", str(out), "--eval-file", str(setup / "eval.txt"), "--teacher", str(out)]) == 0
    itself = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert itself["iia"] == 1.0 and itself["teacher_perplexity"] == itself["perplexity"] == result["perplexity"]
    assert math.isfinite(result["teacher_perplexity"]) and result["teacher_perplexity"] != result["perplexity"]


class Crash(TrainerCallback):
    """Simulates a killed run: raises when step `at` begins (after the checkpoint of the step before)."""

    def __init__(self, at):
        self.at = at

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


def test_resume_after_a_kill_gives_the_uninterrupted_weights(setup, tmp_path):
    kw = {"max_steps": 6, "save_steps": 3, "grad_accum": 2, "batch_size": 3}
    train(_cfg(setup, tmp_path / "whole", **kw))
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(setup, tmp_path / "cut", **kw), callbacks=[Crash(4)])
    assert (tmp_path / "cut" / "checkpoint-3").is_dir() and not (tmp_path / "cut" / "model.safetensors").exists()
    train(_cfg(setup, tmp_path / "cut", resume="latest", **kw))
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    before = _weights(tmp_path / "cut" / "checkpoint-3")
    assert any(not torch.equal(before[k], whole[k]) for k in whole)  # steps 4..6 did change the weights
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=1e-5, atol=1e-6)


class CrashAtEnd(TrainerCallback):
    """Simulates a run killed after its last checkpoint, before the final model is saved."""

    def on_train_end(self, args, state, control, **kw):
        raise KeyboardInterrupt("killed")


def test_resume_after_the_last_checkpoint_takes_no_extra_step(setup, tmp_path):
    kw = {"max_steps": 4, "save_steps": 2}
    train(_cfg(setup, tmp_path / "whole", **kw))
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(setup, tmp_path / "cut", **kw), callbacks=[CrashAtEnd()])
    assert (tmp_path / "cut" / "checkpoint-4").is_dir() and not (tmp_path / "cut" / "model.safetensors").exists()
    summary = train(_cfg(setup, tmp_path / "cut", resume="latest", **kw))
    assert summary["global_step"] == 4
    assert not (tmp_path / "cut" / "checkpoint-5").exists()
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=1e-5, atol=1e-6)


def test_causal_teacher_without_tokenizer(tmp_path, setup):
    torch.manual_seed(0)
    teacher = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_embd=16, n_layer=3, n_head=2, n_positions=64))
    teacher.save_pretrained(tmp_path / "gpt2")  # no tokenizer: one is trained on the data
    summary = train(_cfg(setup, tmp_path / "out", teacher=str(tmp_path / "gpt2"), max_steps=2, alignment="late",
                         student_layers=3))
    assert summary["causal"] and summary["objectives"] == {k: 0.25 for k in ("ce", "clm", "cos", "diito")}
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.n_layer == 3 and (tmp_path / "out" / "tokenizer.json").is_file()


def test_cos_projection_when_hidden_sizes_differ(setup, tmp_path, capsys):
    teacher = tf.BertForMaskedLM.from_pretrained(setup / "teacher")
    cfg = teacher.config
    narrow = tf.BertForMaskedLM(tf.BertConfig(vocab_size=cfg.vocab_size, hidden_size=8, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=8,
                                              max_position_embeddings=64))
    narrow.save_pretrained(tmp_path / "narrow")
    args = ["train", "--teacher", str(setup / "teacher"), "--student", str(tmp_path / "narrow"), "--train-file",
            str(setup / "train.txt"), "--max-steps", "1", "--batch-size", "4", "--no-progress", "--objectives",
            "mlm,cos", "--output-dir", str(tmp_path / "o")]
    assert main(args) == 2
    assert "hidden size is 8 and the teacher's 16" in capsys.readouterr().err
    assert main(args + ["--cos-projection"]) == 0
    assert (tmp_path / "o" / "cos_projection.pt").is_file()


def test_vocabulary_mismatch_is_refused(setup, tmp_path, capsys):
    other = tf.BertForMaskedLM(tf.BertConfig(vocab_size=500, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=8))
    other.save_pretrained(tmp_path / "other")
    code = main(["train", "--teacher", str(setup / "teacher"), "--student", str(tmp_path / "other"),
                 "--train-file", str(setup / "train.txt"), "--output-dir", str(tmp_path / "o"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "vocabulary sizes differ: student 500, teacher" in err


def test_alignment_out_of_range_is_refused(setup, tmp_path, capsys):
    code = main(["train", "--teacher", str(setup / "teacher"), "--train-file", str(setup / "train.txt"),
                 "--output-dir", str(tmp_path / "o"), "--student-layers", "2", "--alignment", "late"])
    assert code == 2 and "n_student must be an int in 3..4" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"", "holds no text"),
    (b"\n  \n", "holds no text"),
    (b"\xff\xfe\x00bad", "cannot read data file"),
    (b"a\nb\nc\n", "shorter than 4 tokens"),
    (b'{"txt": "x"}\n', "needs a 'text' field"),
])
def test_bad_data_files(setup, tmp_path, content, message):
    path = tmp_path / ("data.jsonl" if content.startswith(b"{") else "data.txt")
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        train(_cfg(setup, tmp_path / "o", train_file=str(path)))
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(setup, tmp_path / "o", train_file=str(tmp_path / "missing.txt")))


class Poison(TrainerCallback):
    """Makes the teacher's outputs NaN from step `at` on."""

    def __init__(self, teacher, at):
        self.teacher, self.at = teacher, at

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.at:
            with torch.no_grad():
                self.teacher.get_output_embeddings().bias.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    teacher = tf.BertForMaskedLM.from_pretrained(setup / "teacher")
    out = tmp_path / "o"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*checkpoint-2"):
        train(_cfg(setup, out, max_steps=6), teacher=teacher, callbacks=[Poison(teacher, 3)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists()
    assert all(torch.isfinite(v).all() for v in _weights(out / "checkpoint-2").values())


def test_saved_causal_student_generates_with_its_kv_cache(setup, tmp_path):
    """Saved students carry use_cache: true in config.json and generation_config.json, and generate with a cache
    (fails when the training-time `use_cache: false` is saved with them)."""
    torch.manual_seed(0)
    teacher = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                               use_cache=False))
    teacher.save_pretrained(tmp_path / "gpt2")
    train(_cfg(setup, tmp_path / "out", teacher=str(tmp_path / "gpt2"), max_steps=1, student_layers=1))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["use_cache"] is True
    student = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    out = student.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False,
                           return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape == (1, 6) and out.past_key_values is not None
    assert out.past_key_values.get_seq_length() == 5  # the cache holds every position but the last


def test_warmup_is_a_share_of_the_steps_under_any_transformers(setup, tmp_path):
    """warmup_ratio 0.25 of 8 steps: 2 warmup steps, then linear decay (by hand). Fails if the ratio reaches
    TrainingArguments.warmup_steps as a value < 1 (transformers 4.x reads that as 0 steps)."""
    from applications.distill.run import training_arguments
    from applications.distill.trainer import DistillTrainer, Method

    cfg = _cfg(setup, tmp_path / "o", max_steps=8, warmup_ratio=0.25, learning_rate=1e-3)
    model = torch.nn.Linear(2, 2)
    trainer = DistillTrainer(model=model, args=training_arguments(cfg), method=Method(),
                             warmup_ratio=cfg.warmup_ratio)
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    want = [1e-3 * s / 2 if s < 2 else 1e-3 * (8 - s) / 6 for s in range(8)]
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-15)
