"""`patching_sweep` against a naive loop of single interchanges (one base run per (layer, position)).

The oracle runs `interchange` once per (layer, position) — plain batch-1 runs, no block replay, no
head slicing — so it shares nothing with the sweep's batching. Models are the float64 tiny GPT-2
and Llama of conftest (rotary tables and GQA for Llama), plus a BERT-style encoder with a padded mask.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import VOCAB, hook_ids, randomise, tokens

from interventions import Site, interchange, patching_sweep
from interventions.errors import SelectorError, ShapeError, UnknownSiteError, UnsupportedModelError

SEQ = 6


def naive(model, base, source, layers, positions, readout):
    """[layers, positions, vocab] from one interchange call per (layer, position)."""
    rows = []
    with torch.no_grad():
        for layer in layers:
            row = []
            for p in positions:
                out = interchange(model, base, source, Site(f"layers.{layer}.output", positions=[p]))
                row.append(out.logits[0, readout])
            rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("chunk_tokens", [256, 2 * SEQ, 1])  # one chunk per layer, 2 rows, 1 row per chunk
def test_sweep_equals_naive_loop_all_layers_and_positions(tiny, chunk_tokens):
    base, source = tokens(1, SEQ, seed=1), tokens(1, SEQ, seed=2)
    with torch.no_grad():
        got = patching_sweep(tiny, base, source, chunk_tokens=chunk_tokens)
    n = tiny.config.num_hidden_layers
    expected = naive(tiny, base, source, range(n), range(SEQ), -1)
    assert got.shape == (n, SEQ, VOCAB)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the sweep is not trivially the clean run: patching changes the readout somewhere
    clean = tiny(base).logits[0, -1]
    assert (got - clean).abs().max() > 1e-3


def test_sweep_subset_order_and_readout_follow_the_caller(tiny):
    """Layers in the caller's (unsorted, negative) order; chosen positions; an inner readout; dict inputs."""
    base, source = tokens(1, SEQ, seed=3), tokens(1, SEQ, seed=4)
    mask = torch.ones(1, SEQ, dtype=torch.long)
    layers, positions, readout = [1, 0], [3, 0, -1], 3
    with torch.no_grad():
        got = patching_sweep(tiny, {"input_ids": base, "attention_mask": mask},
                             {"input_ids": source, "attention_mask": mask},
                             layers=[-1, 0], positions=positions, readout=readout)
    expected = naive(tiny, base, source, layers, [3, 0, SEQ - 1], readout)
    assert got.shape == (2, 3, VOCAB)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_sweep_on_a_bert_style_encoder_with_padding():
    """Post-LN encoder, bidirectional attention, a batch-1 padding mask broadcast over the grown batch."""
    config = tf.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=24,
                           vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = randomise(tf.BertForMaskedLM(config)).double().eval()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    base = {"input_ids": tokens(1, SEQ, seed=5), "attention_mask": mask}
    source = {"input_ids": tokens(1, SEQ, seed=6), "attention_mask": mask}
    with torch.no_grad():
        got = patching_sweep(model, base, source, positions=[0, 2, 3], readout=1)
        expected = torch.stack([
            torch.stack([interchange(model, base, source, Site(f"layers.{layer}.output", positions=[p])).logits[0, 1]
                         for p in (0, 2, 3)])
            for layer in range(2)
        ])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_no_hooks_left_after_success_and_after_errors(gpt2):
    before = hook_ids(gpt2)
    base, source = tokens(1, SEQ, seed=7), tokens(1, SEQ, seed=8)
    with torch.no_grad():
        patching_sweep(gpt2, base, source)
    with pytest.raises(SelectorError):
        patching_sweep(gpt2, base, source, positions=[SEQ])
    assert hook_ids(gpt2) == before


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"base": tokens(2, SEQ, seed=9)}, ShapeError, "batch size 1"),
        ({"source": tokens(1, SEQ + 1, seed=9)}, ShapeError, "shape [1, 6]"),
        ({"layers": [0, 5]}, UnknownSiteError, "layers.5.output"),
        ({"layers": [0, 0]}, SelectorError, "repeat"),
        ({"layers": ["0"]}, SelectorError, "ints"),
        ({"positions": [0, SEQ]}, SelectorError, "out of range"),
        ({"positions": [-SEQ - 1]}, SelectorError, "out of range"),
        ({"positions": torch.tensor([[1], [3]])}, SelectorError, "list of ints"),
        ({"readout": SEQ}, SelectorError, "readout"),
        ({"chunk_tokens": 0}, SelectorError, "chunk_tokens"),
    ],
)
def test_bad_input_raises_a_clear_error_before_running(gpt2, kwargs, error, words):
    args = {"base": tokens(1, SEQ, seed=10), "source": tokens(1, SEQ, seed=11), **kwargs}
    calls = []
    handle = gpt2.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error) as info:
            patching_sweep(gpt2, **args)
    finally:
        handle.remove()
    assert words in str(info.value)
    assert calls == []  # nothing ran


def test_pooled_classifier_is_refused():
    """A sequence-level head cannot give a per-position readout: a clear UnsupportedModelError."""
    config = tf.GPT2Config(n_layer=1, n_embd=16, n_head=4, vocab_size=VOCAB, pad_token_id=0, num_labels=3)
    model = tf.GPT2ForSequenceClassification(config).eval()
    with pytest.raises(UnsupportedModelError, match="one row per example"), torch.no_grad():
        patching_sweep(model, tokens(1, SEQ, seed=12), tokens(1, SEQ, seed=13))


class _ScaledLogits(tf.GPT2LMHeadModel):
    """A model whose logits are not its head's raw output (like logit soft-capping or scaling)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_logits_after_the_head_are_respected():
    torch.manual_seed(5)
    model = _ScaledLogits(tf.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32)).eval()
    base, source = tokens(1, SEQ, seed=14), tokens(1, SEQ, seed=15)
    with torch.no_grad():
        got = patching_sweep(model, base, source)
    torch.testing.assert_close(got, naive(model, base, source, range(2), range(SEQ), -1), rtol=0, atol=1e-5)
