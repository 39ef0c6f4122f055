"""Two CPU processes (torchrun, gloo) reach the same weights as one process at the same effective batch."""

import os
import subprocess
import sys

import torch
import transformers as tf
from safetensors.torch import load_file

from applications.distill.corpus import make_corpus
from applications.distill.data import train_tokenizer

tf.logging.set_verbosity_error()


#: Generous: the subprocesses pay the imports, and CI machines may be loaded; a hang still ends.
TIMEOUT = 480
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def one_and_two_processes(tmp_path, common: list[str], accumulation: list[str], torchrun_extra: tuple = ()):
    """The saved weights of `common` run once in one process with `accumulation` flags (output dir `one`) and
    once under torchrun on 2 gloo processes (output dir `two`)."""
    one = subprocess.run([sys.executable, "-m", "applications.distill", *common, *accumulation,
                          "--output-dir", str(tmp_path / "one")], env=ENV, capture_output=True, text=True,
                         timeout=TIMEOUT, check=False)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "applications.distill", *common, *torchrun_extra,
                          "--output-dir", str(tmp_path / "two")], env=ENV, capture_output=True, text=True,
                         timeout=TIMEOUT, check=False)
    assert two.returncode == 0, two.stderr[-2000:]
    return (load_file(str(tmp_path / "one" / "model.safetensors")),
            load_file(str(tmp_path / "two" / "model.safetensors")))


def test_two_processes_match_one_with_accumulation(tmp_path):
    texts = make_corpus(64, seed=5)
    (tmp_path / "train.txt").write_text("\n".join(texts) + "\n")
    tok = train_tokenizer(texts, 100, causal=False)
    torch.manual_seed(0)
    teacher = tf.BertForMaskedLM(tf.BertConfig(  # dropout off: each process has its own dropout stream
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    common = ["train", "--teacher", str(tmp_path / "teacher"), "--train-file", str(tmp_path / "train.txt"),
              "--student-layers", "2", "--batch-size", "4", "--max-steps", "3", "--save-steps", "100",
              "--no-progress", "--no-plot"]
    a, b = one_and_two_processes(tmp_path, common, ["--grad-accum", "2"], ("--grad-accum", "1"))
    start = teacher.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a if k in start)  # training moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_ted_stage2_two_processes_match_one_filters_included(tmp_path):
    """TED stage 2 (mode lwd: the student's projections train beside it, outside DDP's wrapper) under
    torchrun matches one process with accumulation: fails if the extra modules' gradients are not
    averaged across processes (each rank's projections, and so the student, would drift apart)."""
    texts = make_corpus(48, seed=6)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    tok = train_tokenizer(texts, 100, causal=False)
    for name, (layers, seed) in {"teacher": (4, 0), "student": (2, 1)}.items():
        torch.manual_seed(seed)
        model = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=len(tok), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    common = ["ted", "stage2", "--mode", "lwd", "--teacher-interval", "2", "--student-interval", "1",
              "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
              "--train-file", str(tmp_path / "train.tsv"), "--batch-size", "4", "--max-steps", "3",
              "--learning-rate", "1e-2", "--max-length", "24"]
    a, b = one_and_two_processes(tmp_path, common, ["--gradient-accumulation-steps", "2"])
    start = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_offline_teacher_logits_two_processes_match_one(tmp_path):
    """Training from stored top-8 teacher logits under torchrun matches one process with accumulation:
    fails if a rank reads another example's stored logits (top-8 targets differ from example to example)."""
    from applications.distill.teacher_logits import write_teacher_logits

    texts = make_corpus(48, seed=7)
    (tmp_path / "train.txt").write_text("\n".join(texts) + "\n")
    tok = train_tokenizer(texts, 300, causal=True)
    torch.manual_seed(0)
    teacher = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                               resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    write_teacher_logits(str(tmp_path / "teacher"), str(tmp_path / "train.txt"), 8, str(tmp_path / "logits"),
                         max_length=32, batch_size=8, shard_tokens=200)
    common = ["train", "--teacher", str(tmp_path / "teacher"), "--train-file", str(tmp_path / "train.txt"),
              "--teacher-logits", str(tmp_path / "logits"), "--objectives", "ce", "--student-layers", "1",
              "--max-length", "32", "--batch-size", "4", "--max-steps", "3", "--save-steps", "100",
              "--learning-rate", "1e-2", "--no-progress", "--no-plot"]
    a, b = one_and_two_processes(tmp_path, common, ["--grad-accum", "2"])
    start = teacher.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a if k in start)  # training moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
