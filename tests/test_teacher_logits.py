"""Offline teacher logits: the shards against a plain teacher forward, KD / ATKD from top-k against the
live-teacher losses (the existing objectives are the oracle), training trajectories, and every refusal."""

import gc
import json
import shutil
import weakref

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from transformers import TrainerCallback

from applications.distill import run as run_module
from applications.distill.cli import main
from applications.distill.config import DistillConfig
from applications.distill.corpus import make_corpus
from applications.distill.data import train_tokenizer
from applications.distill.objectives.atkd import ATKDConfig, atkd_objective
from applications.distill.objectives.kd import kd_loss
from applications.distill.objectives.topk import atkd_teacher_logits, topk_atkd_objective, topk_kd_loss
from applications.distill.run import train
from applications.distill.teacher_logits import MANIFEST, Manifest, write_teacher_logits

tf.logging.set_verbosity_error()
VOCAB = 300


def _gpt2(seed, vocab=VOCAB):
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                            resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny causal GPT-2 teacher (with its BPE tokenizer), a corpus, and its logits at K = vocab and 8."""
    root = tmp_path_factory.mktemp("teacher_logits")
    texts = make_corpus(40, seed=5)
    (root / "train.txt").write_text("\n".join(texts) + "\n")
    (root / "other.txt").write_text("\n".join(make_corpus(40, seed=6)) + "\n")
    tok = train_tokenizer(texts, VOCAB, causal=True)
    teacher = _gpt2(0)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    for k in (VOCAB, 8):
        write_teacher_logits(str(root / "teacher"), str(root / "train.txt"), k, str(root / f"logits{k}"),
                             max_length=32, batch_size=7, shard_tokens=150)
    return root


def _forward(root, ids):
    teacher = tf.GPT2LMHeadModel.from_pretrained(root / "teacher").eval()
    with torch.no_grad():
        return teacher(input_ids=torch.tensor([ids])).logits[0]


def test_shards_hold_the_teachers_topk_logsumexp_and_gold(setup):
    manifest = Manifest.read(setup / "logits8")
    assert len(manifest.shards) > 1 and manifest.top_k == 8 and manifest.vocab_size == VOCAB
    tok = tf.AutoTokenizer.from_pretrained(setup / "teacher")
    texts = (setup / "train.txt").read_text().split("\n")[:-1]
    for name, first, count in manifest.shards:
        shard = load_file(str(setup / "logits8" / name))
        for j in (0, count - 1):
            ids = tok(texts[first + j], truncation=True, max_length=32)["input_ids"]
            a, b = int(shard["offsets"][j]), int(shard["offsets"][j + 1])
            assert b - a == len(ids)
            logits = _forward(setup, ids)  # a plain forward of the example alone (no padding)
            top = logits.topk(8, dim=-1)
            torch.testing.assert_close(shard["values"][a:b], top.values, atol=1e-5, rtol=0)
            assert torch.equal(shard["indices"][a:b].long(), top.indices)
            torch.testing.assert_close(shard["lse"][a:b], logits.logsumexp(-1), atol=1e-5, rtol=0)
            gold = logits[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            torch.testing.assert_close(shard["gold"][a:b - 1], gold, atol=1e-5, rtol=0)
    assert manifest.num_tokens == sum(int(load_file(str(setup / "logits8" / s[0]))["offsets"][-1])
                                      for s in manifest.shards)


def _logits(seed, shape=(3, 7, VOCAB), scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_with_k_equal_vocab_is_the_live_kd(temperature):
    s, t = _logits(0).requires_grad_(), _logits(1)
    mask = torch.ones(3, 7)
    mask[0, 5:] = 0
    top = t.topk(VOCAB, -1)
    offline = topk_kd_loss(s, top.values, top.indices.int(), mask, temperature)
    (g_off,) = torch.autograd.grad(offline, s)
    live = kd_loss(s, t, mask, temperature)
    (g_live,) = torch.autograd.grad(live, s)
    assert abs(float((offline - live).detach())) < 1e-10
    torch.testing.assert_close(g_off, g_live, atol=1e-12, rtol=0)


def test_small_k_approximates_kd_and_the_error_shrinks_with_k():
    s, t = _logits(2), _logits(3)
    mask = torch.ones(3, 7)
    live = float(kd_loss(s, t, mask, 2.0))
    errors = []
    for k in (8, 64, 256, VOCAB):
        top = t.topk(k, -1)
        errors.append(abs(float(topk_kd_loss(s, top.values, top.indices, mask, 2.0)) - live))
    assert errors[-1] < 1e-10 and errors[0] > errors[1] > errors[2] > errors[3]
    # the approximation is the KL to the top-k renormalised teacher: an independent dense check at k = 8
    top = t.topk(8, -1)
    p = torch.full_like(t, 0.0).scatter(-1, top.indices, torch.softmax(top.values / 2, -1))
    log_q = torch.log_softmax(s / 2, -1)
    direct = (p * (torch.log(p.clamp(min=1e-300)) - log_q)).sum(-1).mean() * 4
    assert abs(float(topk_kd_loss(s, top.values, top.indices, mask, 2.0)) - float(direct)) < 1e-9


def test_atkd_offline_equals_live_at_k_vocab_and_keeps_p_gold_exact_below():
    s, t = _logits(4).requires_grad_(), _logits(5)
    labels = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    labels[1, 5:] = -100
    lse = t.logsumexp(-1)
    gold = torch.cat([t[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0], torch.zeros(3, 1,
                      dtype=t.dtype)], 1)
    cfg = ATKDConfig(lam=0.3, hard_fraction=0.5)
    live, _ = atkd_objective(s, t, labels, causal=True, config=cfg)
    top = t.topk(VOCAB, -1)
    offline, _ = topk_atkd_objective(s, top.values, top.indices, lse, gold, labels, config=cfg)
    assert abs(float((offline - live).detach())) < 1e-9
    torch.testing.assert_close(torch.autograd.grad(offline, s)[0], torch.autograd.grad(live, s)[0], atol=1e-10,
                               rtol=0)
    # K = 4: the gold token is mostly outside the top 4, yet p_g and the normaliser are the teacher's exactly
    top = t.topk(4, -1)
    targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)
    dense = atkd_teacher_logits(top.values, top.indices, lse, gold, targets, VOCAB, torch.float64)
    valid = targets >= 0
    outside = valid & ~(top.indices == targets.clamp(min=0)[..., None]).any(-1)
    assert outside.sum() > 5
    log_p = torch.log_softmax(dense, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(log_p[valid], (gold - lse)[valid], atol=1e-9, rtol=0)
    torch.testing.assert_close(dense.logsumexp(-1)[valid], lse[valid], atol=1e-9, rtol=0)


def _cfg(root, out, **kw):
    base = {"teacher": str(root / "teacher"), "train_file": str(root / "train.txt"), "output_dir": str(out),
            "student_layers": 1, "batch_size": 4, "max_steps": 3, "save_steps": 100, "logging_steps": 1,
            "max_length": 32, "progress": False, "plot": False, "learning_rate": 1e-3, "warmup_ratio": 0.0}
    base.update(kw)
    return DistillConfig(**base)


def _losses(out):
    rows = (out / "log.csv").read_text().splitlines()[1:]
    return {(int(r.split(",")[0]), r.split(",")[1]): float(r.split(",")[2]) for r in rows
            if r.split(",")[1] in ("loss", "loss_ce", "loss_atkd")}


@pytest.mark.parametrize("objectives,temperature", [("ce=0.7,clm=0.3", 2.0), ("atkd", 1.0)])
def test_training_with_k_vocab_follows_the_live_teacher(setup, tmp_path, objectives, temperature):
    live = train(_cfg(setup, tmp_path / "live", objectives=objectives, temperature=temperature))
    offline = train(_cfg(setup, tmp_path / "off", objectives=objectives, temperature=temperature,
                         teacher_logits=str(setup / f"logits{VOCAB}")))
    assert live["global_step"] == offline["global_step"] == 3
    a, b = _losses(tmp_path / "live"), _losses(tmp_path / "off")
    assert a.keys() == b.keys() and len(a) >= 3
    for k in a:
        assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
    wa, wb = load_file(str(tmp_path / "live" / "model.safetensors")), load_file(str(tmp_path / "off" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_cli_trains_from_top8_logits_which_differ_from_the_live_teacher(setup, tmp_path, capsys):
    code = main(["train", "--teacher", str(setup / "teacher"), "--train-file", str(setup / "train.txt"),
                 "--teacher-logits", str(setup / "logits8"), "--objectives", "ce", "--student-layers", "1",
                 "--max-steps", "2", "--max-length", "32", "--output-dir", str(tmp_path / "run"), "--no-progress",
                 "--no-plot", "--per-device-train-batch-size", "4", "--logging-steps", "1", "--learning-rate", "1e-3",
                 "--warmup-ratio", "0"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["global_step"] == 2 and summary["teacher_logits"] == str(setup / "logits8")
    live = train(_cfg(setup, tmp_path / "live", objectives="ce", max_steps=2))
    a, b = _losses(tmp_path / "live"), _losses(tmp_path / "run")
    # top-8 renormalised targets are another (sharper) distribution: the KD losses differ, both finite
    assert a.keys() == b.keys() and all(0 < a[k] < b[k] < 1e3 for k in a)
    assert live["global_step"] == 2


class _TeacherFreed(TrainerCallback):
    """Records, when training begins, whether the loaded teacher has been freed."""

    def __init__(self, refs):
        self.refs, self.alive = refs, None

    def on_train_begin(self, args, state, control, **kwargs):
        gc.collect()
        self.alive = [r() is not None for r in self.refs]


def test_teacher_loads_once_to_initialise_is_freed_before_training_and_never_loads_with_a_student(
        setup, tmp_path, monkeypatch):
    loads, refs = [], []
    real = run_module.load_lm

    def load(path):
        loads.append(path)
        model = real(path)
        refs.append(weakref.ref(model))
        return model

    monkeypatch.setattr(run_module, "load_lm", load)
    freed = _TeacherFreed(refs)
    train(_cfg(setup, tmp_path / "a", objectives="ce", max_steps=1, teacher_logits=str(setup / "logits8")),
          callbacks=[freed])
    assert loads == [str(setup / "teacher")] and freed.alive == [False]
    student = _gpt2(1)
    student.save_pretrained(tmp_path / "student")
    loads.clear()
    train(_cfg(setup, tmp_path / "b", objectives="ce", max_steps=1, student=str(tmp_path / "student"),
               teacher_logits=str(setup / "logits8")))
    assert loads == [str(tmp_path / "student")]


def _refused(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and all(w in err for w in words), err


def _train_argv(setup, out, *extra):
    return ["train", "--teacher", str(setup / "teacher"), "--train-file", str(setup / "train.txt"),
            "--teacher-logits", str(setup / "logits8"), "--student-layers", "1", "--max-steps", "1",
            "--max-length", "32", "--output-dir", str(out), "--no-progress", *extra]


@pytest.mark.parametrize("objectives,word", [("ce,cos", "hidden states"), ("ce,diito", "live teacher forward"),
                                              ("atkd_reverse", "reverse KL"), (None, "cos")])
def test_objectives_needing_the_live_teacher_are_refused_before_loading(setup, tmp_path, capsys, monkeypatch,
                                                                       objectives, word):
    monkeypatch.setattr(run_module, "load_lm", lambda path: pytest.fail("a model was loaded"))
    extra = ["--objectives", objectives] if objectives else []
    _refused(capsys, _train_argv(setup, tmp_path / "out", *extra), "--teacher-logits", word)
    _refused(capsys, _train_argv(setup, tmp_path / "out", "--objectives", "ce", "--eval-file",
                                 str(setup / "train.txt"), "--eval-steps", "1"), "--eval-steps")
    assert not (tmp_path / "out").exists()


def test_mismatched_corpus_tokenizer_or_length_is_refused(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_module, "load_lm", lambda path: pytest.fail("a model was loaded"))
    argv = _train_argv(setup, tmp_path / "out", "--objectives", "ce")
    other = [a if a != str(setup / "train.txt") else str(setup / "other.txt") for a in argv]
    _refused(capsys, other, "corpus hash")
    _refused(capsys, [a if a != "32" else "24" for a in argv], "max_length 32")
    teacher2 = tmp_path / "teacher2"  # the same weights, another tokenizer
    shutil.copytree(setup / "teacher", teacher2)
    tok = train_tokenizer(make_corpus(40, seed=9), VOCAB, causal=True)
    for f in teacher2.glob("*token*"):
        f.unlink()
    tok.save_pretrained(teacher2)
    _refused(capsys, [a if a != str(setup / "teacher") else str(teacher2) for a in argv], "tokenizer hash")
    _refused(capsys, [a if a != str(setup / "logits8") else str(tmp_path) for a in argv], MANIFEST)
    assert not (tmp_path / "out").exists()


def test_masked_lm_teacher_is_refused_before_its_weights_load(setup, tmp_path, capsys):
    bert = tmp_path / "bert"  # a config and a tokenizer only: loading weights would fail differently
    tf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=16).save_pretrained(bert)
    train_tokenizer(make_corpus(40, seed=5), VOCAB, causal=False).save_pretrained(bert)
    _refused(capsys, ["teacher-logits", "--teacher", str(bert), "--train-file", str(setup / "train.txt"),
                      "--top-k", "4", "--output-dir", str(tmp_path / "d")], "masked LM", "causal")
    _refused(capsys, ["train", "--teacher", str(bert), "--train-file", str(setup / "train.txt"), "--teacher-logits",
                      str(setup / "logits8"), "--objectives", "ce", "--student-layers", "1", "--output-dir",
                      str(tmp_path / "o")],
             "causal LM teacher")
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


def test_teacher_logits_output_dir_rules(setup, tmp_path, capsys):
    argv = ["teacher-logits", "--teacher", str(setup / "teacher"), "--train-file", str(setup / "train.txt"),
            "--top-k", "4", "--max-length", "32"]
    _refused(capsys, argv + ["--output-dir", str(setup / "teacher")], "teacher's directory")
    _refused(capsys, argv + ["--top-k", str(VOCAB + 1), "--output-dir", str(tmp_path / "big")], "vocabulary")
    out = tmp_path / "d"
    assert main(argv + ["--output-dir", str(out), "--shard-tokens", "100"]) == 0
    assert len(list(out.glob("teacher-logits-*.safetensors"))) > 2
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["top_k"] == 4 and summary["bytes_per_million_tokens"] > 0
    _refused(capsys, argv + ["--output-dir", str(out)], "not empty")
    (out / "mine.txt").write_text("kept")
    assert main(argv + ["--top-k", "2", "--shard-tokens", "100000", "--output-dir", str(out),
                        "--overwrite-output-dir"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["mine.txt", MANIFEST, "teacher-logits-00000.safetensors"])
    assert Manifest.read(out).top_k == 2
