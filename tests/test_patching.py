"""`patching_sweep` against independent oracles.

- The hand-written GPT-2 / Llama forwards of tests/oracles.py (weights and plain torch only): every
  per-layer site, a batch of pairs with a right-padded mask, position groups, per-example readouts,
  with and without a metric; also layer subsets with gaps and negative indices on a 4-layer model.
- Hand-written torch hooks on a BERT-style encoder (no code of the library in the oracle).
- A naive loop of `interchange` calls (itself oracle-tested in tests/test_oracle.py) for batch-1 runs
  and models whose logits are not the head's raw output.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import CONFIGS, VOCAB, hook_ids, randomise, tokens

import oracles
from interventions import Site, interchange, patching_sweep
from interventions.errors import (
    InterventionError,
    SelectorError,
    ShapeError,
    UnknownSiteError,
    UnsupportedModelError,
)

SEQ = 6
SITES = ["input", "attention_heads", "attention_output", "mlp_output", "output",
         "queries", "keys", "values", "residual_mid", "mlp_hidden"]  # sites of the fine-grained vocabulary


def logit_diff(logits):
    """A logit-difference metric over the batch: mean of logit[3] - logit[7]."""
    return (logits[:, 3] - logits[:, 7]).mean()


def oracle_sweep(model, base, source, layers, groups, readout, site, mask=None, metric=None):
    """The sweep from one hand-written forward per (layer, group[, head]): [L, P, (H,) (n,) vocab] or metrics."""
    src = oracles.forward(model, source, attention_mask=mask)
    heads = model.config.num_attention_heads if site == "attention_heads" else None
    n = base.shape[0]
    rows = torch.arange(n)
    out = []
    for layer in layers:
        name = f"layers.{layer}.{site}"
        per_group = []
        for group in groups:
            per_head = []
            for h in range(heads) if heads else [None]:
                sel = {"positions": list(group), "heads": None if h is None else [h]}
                edit = oracles.interchange_edit(src[name], sel)
                logits = oracles.forward(model, base, {name: edit}, attention_mask=mask)["logits"][rows, readout]
                per_head.append(logits if metric is None else metric(logits))
            per_group.append(torch.stack(per_head) if heads else per_head[0])
        out.append(torch.stack(per_group))
    return torch.stack(out)


def deep_gpt2(layers: int = 4):
    config = CONFIGS["gpt2"]()
    config.n_layer = layers
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config)
    model.config.use_cache = False
    return randomise(model).double().eval()


@pytest.mark.parametrize("site", SITES)
def test_every_site_on_a_padded_batch_matches_the_hand_written_forward(tiny, site):
    """n = 3 pairs, right padding, per-example readout on each last real token, groups and negatives."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    base_ids, source_ids = tokens(3, SEQ, seed=1), tokens(3, SEQ, seed=2)
    base = {"input_ids": base_ids, "attention_mask": mask}
    source = {"input_ids": source_ids, "attention_mask": mask}
    positions, groups = [0, [1, 3], -3], [(0,), (1, 3), (3,)]
    readout = mask.sum(1) - 1
    with torch.no_grad():
        got = patching_sweep(tiny, base, source, positions=positions, readout=readout, site=site, metric=logit_diff)
        logits = patching_sweep(tiny, base, source, positions=positions, readout=readout, site=site, chunk_tokens=7)
    layers = range(tiny.config.num_hidden_layers)
    expected = oracle_sweep(tiny, base_ids, source_ids, layers, groups, readout, site, mask, logit_diff)
    heads = (tiny.config.num_attention_heads,) if site == "attention_heads" else ()
    assert got.shape == (2, 3, *heads)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)
    expected_logits = oracle_sweep(tiny, base_ids, source_ids, layers, groups, readout, site, mask)
    assert logits.shape == (2, 3, *heads, 3, VOCAB)  # n > 1 without a metric: [L, P, (H,) n, vocab]
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-8)
    # patching changes the metric somewhere (the sweep is not the clean run everywhere)
    clean = oracles.forward(tiny, base_ids, attention_mask=mask)["logits"][torch.arange(3), readout]
    assert (got - logit_diff(clean)).abs().max() > 1e-4


@pytest.mark.parametrize("layers", [[1, 2], [0, 2], [2], [-1, 0], [3, 1], [-2]])
@pytest.mark.parametrize("site", ["output", "attention_heads", "input"])
def test_layer_subsets_with_gaps_and_negative_indices(layers, site):
    """Any subset of layers, in the caller's order (today's prefix-only bug: [1, 2], [0, 2], [2] raised)."""
    model = deep_gpt2(4)
    base, source = tokens(2, SEQ, seed=3), tokens(2, SEQ, seed=4)
    with torch.no_grad():
        got = patching_sweep(model, base, source, layers=layers, positions=[1, -1], site=site, metric=logit_diff,
                             chunk_tokens=2 * SEQ)
    absolute = [layer % 4 for layer in layers]
    expected = oracle_sweep(model, base, source, absolute, [(1,), (SEQ - 1,)], torch.full((2,), SEQ - 1), site,
                            metric=logit_diff)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)


def test_attention_pattern_sweep_patches_query_rows(tiny):
    """The pattern's positions select query rows (axis 2): each group is checked against an interchange
    of exactly those rows (interchange of attention_pattern is oracle-tested in test_attention_sites.py)."""
    base, source = tokens(2, SEQ, seed=1), tokens(2, SEQ, seed=2)
    positions = [0, [2, 4], -1]
    with torch.no_grad():
        got = patching_sweep(tiny, base, source, positions=positions, site="attention_pattern", metric=logit_diff)
        for layer in range(tiny.config.num_hidden_layers):
            for j, group in enumerate([[0], [2, 4], [-1]]):
                site = Site(f"layers.{layer}.attention_pattern", positions=group)
                expected = logit_diff(interchange(tiny, base, source, site).logits[:, -1])
                torch.testing.assert_close(got[layer, j], expected, rtol=0, atol=1e-6)  # float32 softmax (Llama)
    assert got.shape == (2, 3)


@pytest.mark.parametrize("chunk_tokens", [256, 2 * SEQ, 1])  # one chunk per layer, 2 rows, 1 row per chunk
def test_batch_one_without_metric_keeps_todays_output(tiny, chunk_tokens):
    """n = 1, no metric: [layers, positions, vocab], equal to one interchange per (layer, position)."""
    base, source = tokens(1, SEQ, seed=1), tokens(1, SEQ, seed=2)
    with torch.no_grad():
        got = patching_sweep(tiny, base, source, chunk_tokens=chunk_tokens)
        n = tiny.config.num_hidden_layers
        expected = torch.stack([
            torch.stack([interchange(tiny, base, source, Site(f"layers.{layer}.output", positions=[p])).logits[0, -1]
                         for p in range(SEQ)])
            for layer in range(n)
        ])
    assert got.shape == (n, SEQ, VOCAB)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)


def test_subset_order_readout_and_groups_follow_the_caller_batch_one(tiny):
    """Layers in the caller's (unsorted, negative) order; groups; an inner readout; against interchange."""
    base, source = tokens(1, SEQ, seed=3), tokens(1, SEQ, seed=4)
    positions = [3, [0, 1, 2], -1]
    with torch.no_grad():
        got = patching_sweep(tiny, base, source, layers=[-1, 0], positions=positions, readout=3,
                             site="mlp_output")
        expected = torch.stack([
            torch.stack([interchange(tiny, base, source, Site(f"layers.{layer}.mlp_output", positions=p)).logits[0, 3]
                         for p in ([3], [0, 1, 2], [-1])])
            for layer in (1, 0)
        ])
    assert got.shape == (2, 3, VOCAB)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)


def _bert():
    config = tf.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=24,
                           vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return randomise(tf.BertForMaskedLM(config)).double().eval()


@pytest.mark.parametrize("site", ["output", "attention_heads"])
def test_bert_style_encoder_against_hand_written_hooks(site):
    """Post-LN, bidirectional attention, padded batch of 2; the oracle is plain torch hooks on the modules."""
    model = _bert()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    base_ids, source_ids = tokens(2, SEQ, seed=5), tokens(2, SEQ, seed=6)
    base = {"input_ids": base_ids, "attention_mask": mask}
    source = {"input_ids": source_ids, "attention_mask": mask}
    readout = torch.tensor([1, 4])
    with torch.no_grad():
        got = patching_sweep(model, base, source, positions=[0, [2, 3]], readout=readout, site=site, metric=logit_diff)
    heads = 4 if site == "attention_heads" else None

    def module_of(layer):
        block = model.bert.encoder.layer[layer]
        return block.attention.output.dense if heads else block

    def run(inputs, layer=None, edit=None, record=None):
        if heads:  # the input of the attention's output projection, viewed per head
            def hook(module, args):
                x = args[0].reshape(*args[0].shape[:2], heads, -1)
                if record is not None:
                    record.append(x.clone())
                return None if edit is None else (edit(x).reshape(args[0].shape),)
            handle = module_of(layer).register_forward_pre_hook(hook)
        else:
            def hook(module, args, output):
                if record is not None:
                    record.append(output.clone())
                return None if edit is None else edit(output)
            handle = module_of(layer).register_forward_hook(hook)
        try:
            return model(**inputs).logits
        finally:
            handle.remove()

    expected = torch.zeros_like(got)
    with torch.no_grad():
        for layer in range(2):
            src = []
            run(source, layer, record=src)
            for g, group in enumerate([[0], [2, 3]]):
                for h in range(heads) if heads else [None]:
                    def edit(x, group=group, h=h):
                        x = x.clone()
                        for p in group:
                            if h is None:
                                x[:, p] = src[0][:, p]
                            else:
                                x[:, p, h] = src[0][:, p, h]
                        return x
                    logits = run(base, layer, edit)[torch.arange(2), readout]
                    expected[(layer, g) + ((h,) if heads else ())] = logit_diff(logits)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)


def test_metric_values_are_reduced_chunk_by_chunk():
    """With a metric, readout logits become metric values as chunks come: the head never sees more than about
    `chunk_tokens` rows at once, and metrics are computed before the last patched forward (memory does not grow
    with the number of copies)."""
    model = deep_gpt2(4)
    events, head_rows = [], []
    handles = [model.transformer.h[3].register_forward_hook(lambda *a: events.append("forward")),
               model.lm_head.register_forward_pre_hook(lambda m, args: head_rows.append(args[0].shape[0]))]

    def metric(logits):
        events.append("metric")
        return logit_diff(logits)

    base, source = tokens(2, SEQ, seed=7), tokens(2, SEQ, seed=8)
    try:
        with torch.no_grad():
            got = patching_sweep(model, base, source, site="attention_heads", metric=metric, chunk_tokens=2 * SEQ)
    finally:
        for h in handles:
            h.remove()
    n_copies = 4 * SEQ * 4  # layers x positions x heads
    assert events.count("metric") == n_copies + 1  # + the check on the clean run
    last_forward = max(i for i, e in enumerate(events) if e == "forward")
    assert events[:last_forward].count("metric") >= n_copies // 2  # most were reduced before the sweep ended
    assert max(head_rows) <= 2 * SEQ + 2  # chunk_tokens rows plus one chunk (1 copy x 2 examples), never all 192
    expected = oracle_sweep(model, base, source, range(4), [(p,) for p in range(SEQ)], torch.full((2,), SEQ - 1),
                            "attention_heads", metric=logit_diff)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)


def test_no_hooks_left_after_success_and_after_errors(gpt2):
    before = hook_ids(gpt2)
    base, source = tokens(2, SEQ, seed=7), tokens(2, SEQ, seed=8)
    with torch.no_grad():
        patching_sweep(gpt2, base, source, site="attention_heads", metric=logit_diff)
    with pytest.raises(SelectorError):
        patching_sweep(gpt2, base, source, positions=[SEQ])
    with pytest.raises(InterventionError, match="0-dim"):
        patching_sweep(gpt2, base, source, metric=lambda logits: logits[:, 0])
    seen = []

    def flaky(logits):  # right on the clean run, wrong on the first patched copy
        seen.append(1)
        return logit_diff(logits) if len(seen) == 1 else logits

    with pytest.raises(InterventionError, match="0-dim"):
        patching_sweep(gpt2, base, source, metric=flaky)
    assert len(seen) == 2
    assert hook_ids(gpt2) == before


PAD = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])


def _padded(seed):
    return {"input_ids": tokens(2, SEQ, seed=seed), "attention_mask": PAD}


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"base": tokens(2, SEQ, seed=9)}, ShapeError, "shape [2, 6]"),
        ({"source": tokens(1, SEQ + 1, seed=9)}, ShapeError, "shape [1, 6]"),
        ({"layers": [0, 5]}, SelectorError, "layers [5] out of range: the model has 2 blocks (valid 0..1"),
        ({"layers": [0, 0]}, SelectorError, "repeat"),
        ({"layers": ["0"]}, SelectorError, "ints"),
        ({"positions": [0, SEQ]}, SelectorError, "out of range"),
        ({"positions": [-SEQ - 1]}, SelectorError, "out of range"),
        ({"positions": [[0, SEQ]]}, SelectorError, "out of range"),
        ({"positions": [[]]}, SelectorError, "non-empty list of ints"),
        ({"positions": ["0"]}, SelectorError, "an int or a non-empty list"),
        ({"positions": torch.tensor([[1], [3]])}, SelectorError, "list of ints"),
        ({"readout": SEQ}, SelectorError, "readout"),
        ({"readout": torch.tensor([1, 2])}, SelectorError, "[1]"),
        ({"readout": 1.5}, SelectorError, "readout"),
        ({"chunk_tokens": 0}, SelectorError, "chunk_tokens"),
        ({"site": "mlp"}, UnknownSiteError, "valid: input, queries, keys, values, attention_pattern, attention_heads, attention_output, residual_mid, mlp_hidden, mlp_output, output"),
        ({"site": "layers.1.output"}, UnknownSiteError, "site='output', layers=[1]"),
        ({"metric": "logit_diff"}, InterventionError, "metric must be callable"),
        ({"base": _padded(1), "source": _padded(2), "positions": [0]}, SelectorError,
         "readout position 5 of example 0 is padding"),
        ({"base": _padded(1), "source": _padded(2), "readout": torch.tensor([3, 5]), "positions": [1, 4]},
         SelectorError, "positions on padding"),
        ({"base": _padded(1), "source": tokens(3, SEQ, seed=2)}, ShapeError, "base's shape [2, 6]"),
    ],
)
def test_bad_input_raises_a_clear_error_before_running(gpt2, kwargs, error, words):
    args = {"base": tokens(1, SEQ, seed=10), "source": tokens(1, SEQ, seed=11), **kwargs}
    ran = []
    handle = gpt2.register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(error) as info:
            patching_sweep(gpt2, **args)
    finally:
        handle.remove()
    assert words in str(info.value)
    assert ran == []  # nothing ran


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
    base, source = tokens(2, SEQ, seed=14), tokens(2, SEQ, seed=15)
    with torch.no_grad():
        got = patching_sweep(model, base, source, site="attention_heads", metric=logit_diff)
        expected = torch.stack([
            torch.stack([
                torch.stack([logit_diff(interchange(model, base, source, Site(
                    f"layers.{layer}.attention_heads", positions=[p], heads=[h])).logits[:, -1]) for h in range(2)])
                for p in range(SEQ)])
            for layer in range(2)
        ])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_documented_sweep_example_runs():
    """docs/workflows.md's patching-with-a-metric example runs as written, with the documented shapes."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "workflows.md").read_text()
    section = text.split("## Activation patching with a metric: `patching_sweep`", 1)[1].split("\n## ", 1)[0]
    scope: dict = {}
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "docs/workflows.md sweep", "exec"), scope)
    assert scope["resid"].shape == (2, 8)
    assert scope["heads"].shape == (2, 8, 4)
    assert scope["mlps"].shape == (1, 2)
    # patching every position at the last layer's output with the clean run gives the clean metric back
    with torch.no_grad():
        full = patching_sweep(scope["model"], scope["corrupted"], scope["clean"], layers=[-1], positions=[list(range(8))],
                              metric=scope["logit_diff"])
        clean = scope["logit_diff"](scope["model"](scope["clean"]).logits[:, -1])
    torch.testing.assert_close(full[0, 0], clean, rtol=1e-5, atol=1e-6)


def test_replay_with_repeat_equals_the_repeated_batch(gpt2):
    """replay_blocks(repeat=r): a forward on r copies of the recorded batch, blocks 0..upto replayed, equals the
    plain forward on those copies; a batch of the wrong size is refused."""
    from interventions import record_blocks, replay_blocks

    x = tokens(2, SEQ, seed=20)
    with torch.no_grad():
        with record_blocks(gpt2) as recording:
            gpt2(x)
        repeated = x.repeat(3, 1)
        with replay_blocks(gpt2, recording, upto=0, repeat=3):
            got = gpt2(repeated).logits
        torch.testing.assert_close(got, gpt2(repeated).logits, rtol=0, atol=1e-10)
        with pytest.raises(ShapeError, match="repeat 3"), replay_blocks(gpt2, recording, upto=1, repeat=3):
            gpt2(x)
    with pytest.raises(InterventionError, match="repeat must be a positive int"):
        with replay_blocks(gpt2, recording, upto=0, repeat=0):
            pass
