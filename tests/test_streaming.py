"""`--streaming` (streaming.py): the streamed corpus gives the map-style path's texts and examples, repeats
(reshuffled per pass), refuses bad input before any model loads, and resumes after a kill with the
uninterrupted run's examples, step by step, and weights; map-style resume is checked the same way.

Oracles: `read_texts` / `TokenizedTexts` (the map-style reader and tokenization, independent code
paths) for what a stream holds; an uninterrupted run for what a resumed run must see and reach.
"""

import json

import datasets
import pytest
import torch
import transformers as tf
from conftest import save_bert_teacher
from safetensors.torch import load_file
from torch.utils.data import IterableDataset
from transformers import TrainerCallback

from applications.distill import run as run_module
from applications.distill.cli import main
from applications.distill.config import DistillConfig
from applications.distill.corpus import make_corpus
from applications.distill.data import TokenizedTexts, read_texts
from applications.distill.errors import DataError, DistillConfigError
from applications.distill.run import train
from applications.distill.streaming import StreamedCorpus, StreamedTexts
from applications.distill.trainer import DistillTrainer

tf.logging.set_verbosity_error()
datasets.disable_progress_bars()

N_TRAIN = 10  # few lines: a 6-step run of 2 x 3 examples a step goes through the corpus 3.6 times


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny saved BERT teacher with its tokenizer and a 10-line training file (with blank lines)."""
    root = tmp_path_factory.mktemp("stream")
    texts = make_corpus(40, seed=4)
    (root / "train.txt").write_text("\n".join(texts[:5]) + "\n\n   \n" + "\n".join(texts[5:N_TRAIN]) + "\n")
    save_bert_teacher(root / "teacher", texts, 120, layers=2)
    return root, texts


def _cfg(root, out, **kw):
    base = {"teacher": str(root / "teacher"), "train_file": str(root / "train.txt"), "output_dir": str(out),
            "student_layers": 1, "batch_size": 3, "grad_accum": 2, "max_steps": 6, "save_steps": 3,
            "logging_steps": 1, "progress": False, "plot": False}
    base.update(kw)
    return DistillConfig(**base)


def _tokenizer(root):
    return tf.AutoTokenizer.from_pretrained(root / "teacher")


# -- what a stream holds ------------------------------------------------------------------------------
def _corpora(tmp_path, texts):
    """The same records as a .txt, a .jsonl with another column name, a saved Dataset and DatasetDict."""
    records = [texts[0], "", "  " + texts[1] + "  ", texts[2], "   ", texts[3]]
    (tmp_path / "c.txt").write_text("\n".join(records) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": r, "n": i}) + "\n" for i, r in enumerate(records)))
    datasets.Dataset.from_dict({"body": records}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": records})}).save_to_disk(str(tmp_path / "dd"))
    return [(tmp_path / "c.txt", "text"), (tmp_path / "c.jsonl", "body"), (tmp_path / "saved", "body"),
            (tmp_path / "dd", "body")]


def test_a_stream_holds_the_texts_read_texts_reads(setup, tmp_path):
    _, texts = setup
    for path, column in _corpora(tmp_path, texts):
        expected = read_texts(str(path), column)
        corpus = StreamedCorpus(str(path), column)
        assert list(corpus) == expected == [texts[0], texts[1], texts[2], texts[3]], path
        # idx: the position among non-empty records, the index read_texts gives
        assert [r["idx"] for r in corpus.iter_records()] == [0, 1, 2, 3]


def test_streamed_examples_are_the_map_style_examples(setup):
    """Tokenization, truncation, the min-length rule, their counts and the masking token counts equal
    `TokenizedTexts`' on the same file (max_length 20 truncates some lines, min_length 16 drops some)."""
    root, _ = setup
    tok = _tokenizer(root)
    path = str(root / "train.txt")
    texts = read_texts(path)
    mapped = TokenizedTexts(texts, tok, max_length=20, min_length=16, source=path)
    assert mapped.dropped > 0 and mapped.truncated > 0  # the rules are exercised
    streamed = StreamedTexts(StreamedCorpus(path), tok, max_length=20, min_length=16)
    assert streamed.examples is None  # counts are known after one pass only
    one = list(streamed.one_pass(0))
    assert [e["input_ids"] for e in one] == mapped.examples
    assert (streamed.examples, streamed.dropped, streamed.truncated) == (len(mapped), mapped.dropped,
                                                                         mapped.truncated)
    # each example's idx names its text: tokenizing texts[idx] by hand gives its ids
    for e in one:
        assert e["input_ids"] == tok(texts[e["idx"]], truncation=True, max_length=20)["input_ids"]
    assert torch.equal(streamed.token_counts(len(tok)), mapped.token_counts(len(tok)))


def test_the_stream_repeats_and_each_pass_is_reshuffled(setup):
    root, _ = setup
    tok = _tokenizer(root)
    corpus = StreamedCorpus(str(root / "train.txt"))
    n = len(read_texts(str(root / "train.txt")))

    def first(ds, k):
        it = iter(ds)
        return [next(it)["idx"] for _ in range(k)]

    plain = first(StreamedTexts(corpus, tok, 64), 3 * n)
    assert plain == list(range(n)) * 3  # file order, pass after pass: the Trainer never sees an end
    shuffled = first(StreamedTexts(corpus, tok, 64, shuffle_buffer=4, seed=1), 3 * n)
    passes = [shuffled[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(p) == list(range(n)) for p in passes)  # each pass: every example once
    assert passes[0] != plain[:n] and len({tuple(p) for p in passes}) > 1  # shuffled, and anew each pass
    assert first(StreamedTexts(corpus, tok, 64, shuffle_buffer=4, seed=1), 3 * n) == shuffled  # deterministic


# -- bad input, before any model loads ---------------------------------------------------------------------
@pytest.fixture
def no_models(monkeypatch):
    """Loading any model fails the test: errors must come before."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the data error")
    monkeypatch.setattr(run_module, "load_lm", refuse)


@pytest.mark.parametrize("name, content, message", [
    ("e.txt", b"", "holds no text"),
    ("e.txt", b"\n  \n", "holds no text"),
    ("u.txt", b"\xff\xfe\x00bad", "cannot (open|read) data file"),
    ("s.txt", b"a\nb\nc\n", "shorter than 4 tokens"),
    ("c.jsonl", b'{"txt": "x"}\n', "has no 'text' field"),
    ("n.jsonl", b'{"text": "a b c d e"}\n{"text": null}\n', "has no 'text' field"),
    ("b.jsonl", b'{"text": "a b c d e"}\n{"text": "f g h"}\nnot json\n', "cannot (open|read) data file"),
    ("e.jsonl", b"", "holds no text"),
])
def test_bad_streamed_data_fails_before_any_model_loads(setup, tmp_path, no_models, name, content, message):
    root, _ = setup
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        train(_cfg(root, tmp_path / "o", train_file=str(path), streaming=True))
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(root, tmp_path / "o", train_file=str(tmp_path / "missing.txt"), streaming=True))
    (tmp_path / "notds").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        train(_cfg(root, tmp_path / "o", train_file=str(tmp_path / "notds"), streaming=True))


def test_saved_dataset_without_the_column_is_refused(setup, tmp_path, no_models):
    root, _ = setup
    datasets.Dataset.from_dict({"body": ["a b c d e f"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="has no column 'text'"):
        train(_cfg(root, tmp_path / "o", train_file=str(tmp_path / "saved"), streaming=True))


def test_options_streaming_cannot_serve_are_refused(setup, tmp_path, capsys):
    root, _ = setup
    with pytest.raises(DistillConfigError, match="--streaming needs --max-steps"):
        _cfg(root, tmp_path / "o", streaming=True, max_steps=None)
    with pytest.raises(DistillConfigError, match="--teacher-logits cannot be combined with --streaming"):
        _cfg(root, tmp_path / "o", streaming=True, teacher_logits=str(tmp_path))
    with pytest.raises(DistillConfigError, match="give --streaming too"):
        _cfg(root, tmp_path / "o", shuffle_buffer=100)
    with pytest.raises(DistillConfigError, match="must be >= 0"):
        _cfg(root, tmp_path / "o", streaming=True, shuffle_buffer=-1)
    code = main(["train", "--teacher", str(root / "teacher"), "--train-file", str(root / "train.txt"),
                 "--output-dir", str(tmp_path / "cli"), "--streaming"])
    assert code == 2 and "--streaming needs --max-steps" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_a_read_error_later_in_the_stream_is_a_data_error(setup):
    """Past the first read chunk (1 MB) a parse error surfaces while training; it is a DataError too."""
    import pyarrow as pa

    root, _ = setup
    corpus = StreamedCorpus(str(root / "train.txt"))

    def breaks_after_two():
        yield from ({"text": "a b", "idx": i} for i in range(2))
        raise pa.ArrowInvalid("JSON parse error: Invalid value. in row 7")
    with pytest.raises(DataError, match="cannot read data file .*row 7"):
        list(corpus.iter_records(breaks_after_two()))


def test_a_causal_teacher_without_tokenizer_gets_one_trained_on_the_stream(setup, tmp_path):
    from applications.distill.data import train_tokenizer

    root, _ = setup
    torch.manual_seed(0)
    teacher = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_embd=16, n_layer=2, n_head=2, n_positions=64))
    teacher.save_pretrained(tmp_path / "gpt2")  # no tokenizer: one is trained on the data
    summary = train(_cfg(root, tmp_path / "out", teacher=str(tmp_path / "gpt2"), max_steps=2, objectives="ce,clm",
                         streaming=True))
    assert summary["causal"] and summary["global_step"] == 2
    trained = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    # the same tokenizer as one trained on the whole file read at once (same texts, same order)
    assert trained.get_vocab() == train_tokenizer(read_texts(str(root / "train.txt")), 300, causal=True).get_vocab()


# -- what the Trainer gets ----------------------------------------------------------------------------------
class SeenDataset(TrainerCallback):
    def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
        self.dataset, self.dispatch = train_dataloader.dataset, args.accelerator_config.dispatch_batches


def test_the_streaming_path_never_reads_the_whole_file_and_hands_the_trainer_a_stream(setup, tmp_path, monkeypatch):
    root, _ = setup

    def whole_file(*a, **k):
        raise AssertionError("read_texts read the training file whole")
    monkeypatch.setattr(run_module, "read_texts", whole_file)
    seen = SeenDataset()
    summary = train(_cfg(root, tmp_path / "o", streaming=True, objectives="ce,mlm", max_steps=2), callbacks=[seen])
    assert isinstance(seen.dataset, IterableDataset) and isinstance(seen.dataset, StreamedTexts)
    assert not hasattr(seen.dataset, "__len__")
    # under torchrun each process reads its own share (process 0 cannot concatenate our padded batches)
    assert seen.dispatch is False
    assert summary["global_step"] == 2 and summary["data"]["streaming"] is True
    # the masked-LM token counts took one pass: its counts are known from the start
    assert summary["data"]["examples"] == len(read_texts(str(root / "train.txt"))) == N_TRAIN


# -- resume after a kill --------------------------------------------------------------------------------------
class Crash(TrainerCallback):
    """Simulates a killed run: raises when step `at` begins (after the checkpoint of the step before)."""

    def __init__(self, at):
        self.at = at

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


@pytest.fixture
def record(monkeypatch):
    """Every training micro-batch's (optimizer step, idx, input_ids), in order, across train() calls."""
    seen: list[tuple[int, list[int], list[list[int]]]] = []
    original = DistillTrainer.compute_loss

    def recording(self, model, inputs, *a, **k):
        if model.training:
            seen.append((self.state.global_step, list(inputs["idx"]), inputs["input_ids"].tolist()))
        return original(self, model, inputs, *a, **k)
    monkeypatch.setattr(DistillTrainer, "compute_loss", recording)
    return seen


def _resume_matches(root, tmp_path, record, **kw):
    whole = train(_cfg(root, tmp_path / "whole", **kw))
    uninterrupted = list(record)
    record.clear()
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(root, tmp_path / "cut", **kw), callbacks=[Crash(4)])
    assert (tmp_path / "cut" / "checkpoint-3").is_dir() and not (tmp_path / "cut" / "model.safetensors").exists()
    before_kill = list(record)
    record.clear()
    resumed = train(_cfg(root, tmp_path / "cut", resume="latest", **kw))
    after = list(record)
    assert whole["global_step"] == resumed["global_step"] == 6
    # steps 0..3 ran before the kill (the step-3 checkpoint came after step 3's update, i.e. at global step 3);
    # the resumed run trains steps 3..5 on exactly the batches the uninterrupted run trained them on
    assert before_kill == [r for r in uninterrupted if r[0] < 4]
    assert after == [r for r in uninterrupted if r[0] >= 3]
    idx = [i for r in uninterrupted for i in r[1]]
    assert len(set(idx)) < len(idx)  # the run went through the corpus more than once
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" /
                                                                                  "model.safetensors"))
    start = load_file(str(tmp_path / "cut" / "checkpoint-3" / "model.safetensors"))
    assert any(not torch.equal(start[k], a[k]) for k in a)  # steps 4..6 changed the weights
    for k in a:
        assert torch.equal(b[k], a[k]), k  # bit-equal: the same batches, the same RNG state, one process
    return uninterrupted


def test_streamed_resume_continues_from_the_right_example(setup, tmp_path, record):
    seen = _resume_matches(setup[0], tmp_path, record, streaming=True, shuffle_buffer=4)
    # a stream repeats across the end of the corpus inside one batch: every micro-batch is full
    assert len(seen) == 6 * 2 and all(len(r[1]) == 3 for r in seen)


def test_map_style_resume_continues_from_the_right_example(setup, tmp_path, record):
    _resume_matches(setup[0], tmp_path, record)


# -- two processes ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_streaming_processes_see_distinct_examples_and_match_one_with_accumulation(setup, tmp_path):
    """torchrun, 2 gloo CPU processes, batch 3 each, vs 1 process with 2 accumulated batches of 3: the same
    weights. accelerate's IterableDatasetShard gives process p the p-th batch of every window of 2 batches,
    the examples one process accumulates in a step; processes reading the same examples (or the stream
    restarting) would change the gradients. A hang still ends (timeout)."""
    import os
    import subprocess
    import sys

    root, texts = setup
    # dropout off: each process has its own dropout stream
    save_bert_teacher(tmp_path / "teacher", texts, 120, layers=2, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    common = ["train", "--teacher", str(tmp_path / "teacher"), "--train-file", str(root / "train.txt"), "--streaming",
              "--shuffle-buffer", "4", "--student-layers", "1", "--batch-size", "3", "--max-steps", "3",
              "--save-steps", "100", "--no-progress", "--no-plot", "--objectives", "ce,mlm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    assert main([*common, "--grad-accum", "2", "--output-dir", str(tmp_path / "one")]) == 0  # one process: here
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "applications.distill", *common, "--grad-accum", "1", "--output-dir",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" /
                                                                                "model.safetensors"))
    start = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a if k in start)  # training moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
