"""Attention-internal sites (queries, keys, values, attention_pattern): oracles, identities, errors.

GPT-2 and Llama (GQA, rotary) against the hand-written forwards of tests/oracles.py (read, set a
tensor / a callable, zero, interchange; every selector; rtol 1e-5). Then identities on the tiny
configs of tests/architectures.py, under the model's default attention implementation and under the
other of sdpa / eager where both exist: the pattern is causal, respects the sliding window, rows sum
to 1, equals softmax(q·kᵀ·scale + mask) recomputed from the queries and keys; computing it explicitly
at a layer leaves the output unchanged. Bad input, hook and registry hygiene.
"""

from __future__ import annotations

import inspect

import architectures as A
import oracles
import pytest
import torch
import transformers as tf
from conftest import build, hook_ids, tokens

from interventions import (
    RotatedSubspace,
    SelectorError,
    ShapeError,
    Site,
    SiteGraph,
    UnsupportedModelError,
    Zero,
    get_value,
    interchange,
    set_value,
)
from interventions.attention import UNSUPPORTED

TOL = {"rtol": 1e-5, "atol": 1e-6}
ATTN = ("queries", "keys", "values", "attention_pattern")
BASE = tokens(2, 6, seed=1)
SOURCE = tokens(2, 6, seed=2)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return build(request.param)


# -- the oracle's selector semantics, with the pattern's axes ([b, heads, q, k]) -----------------
def _sel(name, value, positions=None, heads=None, dims=None):
    if name.endswith("attention_pattern"):  # view as [b, q, heads, k], select, view back
        return oracles.select(value.transpose(1, 2), positions, heads, dims).transpose(1, 2)
    return oracles.select(value, positions, heads, dims)


def _edit(name, fn, positions=None, heads=None, dims=None):
    def edit(value):
        if name.endswith("attention_pattern"):
            t = value.transpose(1, 2)
            new = oracles.write(t, fn(oracles.select(t, positions, heads, dims).transpose(1, 2)).transpose(1, 2),
                                positions, heads, dims)
            return new.transpose(1, 2)
        return oracles.write(value, fn(oracles.select(value, positions, heads, dims)), positions, heads, dims)
    return edit


SELECTORS = [
    {},
    {"positions": [1, 4]},
    {"heads": [1]},
    {"positions": [5, 2], "heads": [0, 1], "dims": [0, 3]},
    {"positions": torch.tensor([[0, 5], [3, 2]])},
]


# -- against the oracles ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ATTN)
@pytest.mark.parametrize("sel", SELECTORS, ids=lambda s: "-".join(s) or "whole")
def test_read_matches_oracle(model, kind, sel):
    ref = oracles.forward(model, BASE)
    for layer in (0, 1):
        name = f"layers.{layer}.{kind}"
        got = get_value(model, BASE, Site(name, **sel))
        torch.testing.assert_close(next(iter(got.values())), _sel(name, ref[name], **sel), **TOL)


@pytest.mark.parametrize("kind", ATTN)
@pytest.mark.parametrize("sel", SELECTORS[:4], ids=lambda s: "-".join(s) or "whole")
def test_set_tensor_callable_and_zero_match_oracle(model, kind, sel):
    name = f"layers.1.{kind}"
    ref = oracles.forward(model, BASE)
    shape = _sel(name, ref[name], **sel).shape
    value = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    before = hook_ids(model)
    cases = [
        (value, lambda cur: value),
        (lambda cur: 2.0 * cur + 0.1, lambda cur: 2.0 * cur + 0.1),
        (Zero(), torch.zeros_like),
    ]
    for engine_value, oracle_fn in cases:
        got = set_value(model, {Site(name, **sel): engine_value}, inputs=BASE).logits
        want = oracles.forward(model, BASE, {name: _edit(name, oracle_fn, **sel)})["logits"]
        torch.testing.assert_close(got, want, **TOL)
        assert not torch.allclose(got, ref["logits"])  # the edit changed something
    assert hook_ids(model) == before


@pytest.mark.parametrize("kind", ATTN)
def test_interchange_with_source_sites_matches_oracle(model, kind):
    name = f"layers.1.{kind}"
    base_sel, src_sel = {"positions": [4, 5], "heads": [1]}, {"positions": [2, 3], "heads": [0]}
    src = oracles.forward(model, SOURCE)[name]
    got = interchange(model, BASE, SOURCE, Site(name, **base_sel), source_sites=Site(name, **src_sel)).logits
    want_value = _sel(name, src, **src_sel)
    want = oracles.forward(model, BASE, {name: _edit(name, lambda cur: want_value, **base_sel)})["logits"]
    torch.testing.assert_close(got, want, **TOL)
    # the in-batch mode gives the same answer (same site in base and source)
    got_b = interchange(model, BASE, SOURCE, Site(name, **base_sel), in_batch=True).logits
    want_b = oracles.forward(model, BASE, {name: _edit(name, lambda cur: _sel(name, src, **base_sel), **base_sel)})
    torch.testing.assert_close(got_b, want_b["logits"], **TOL)


def test_queries_keys_values_feed_the_pattern_and_heads(model):
    """Cross-site: the engine's q, k, v reproduce its own pattern and its attention_heads."""
    names = [f"layers.1.{k}" for k in (*ATTN, "attention_heads")]
    out = get_value(model, BASE, names)
    q, k, v, p, z = (out[n] for n in names)
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(torch.softmax(scores.masked_fill(~causal, float("-inf")), -1), p, **TOL)
    torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", p, v), z, **TOL)


def test_das_and_gradients_on_values(model):
    """A DAS rotation on a key/value head's values trains: the gradient reaches R and the source."""
    name = "layers.0.values"
    head_dim = get_value(model, BASE, name)[name].shape[-1]
    das = RotatedSubspace(head_dim, 2).double()
    out = interchange(model, BASE, SOURCE, Site(name, positions=[3], heads=[1]), intervention=das).logits
    out[:, -1].sum().backward()
    grad = das.rotation.linear.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0
    pattern = get_value(model, BASE, "layers.1.attention_pattern")["layers.1.attention_pattern"]
    new = pattern.detach().clone().requires_grad_(True)
    set_value(model, {"layers.1.attention_pattern": new}, inputs=BASE).logits.sum().backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    assert new.grad.triu(1).abs().sum() > 0  # every weight is a leaf of the mixing, masked or not


def test_padding_is_respected(model):
    """Right padding: keys on padding get zero weight, rows still sum to 1 (oracle too)."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    inputs = {"input_ids": BASE, "attention_mask": mask}
    p = get_value(model, inputs, "layers.1.attention_pattern")["layers.1.attention_pattern"]
    assert p[1, :, :4, 4:].abs().max() == 0
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    ref = oracles.forward(model, BASE, attention_mask=mask)["layers.1.attention_pattern"]
    torch.testing.assert_close(p[:, :, :4], ref[:, :, :4], **TOL)


# -- architectures we cannot intercept ----------------------------------------------------------
def _model_type(name):
    return A.VARIANTS.get(name, (name, {}))[0]


def _attention_registry_state():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    return dict(AttentionInterface._global_mapping), dict(ALL_ATTENTION_FUNCTIONS._local_mapping)


def _eager_globals(model):
    graph = SiteGraph.from_model(model)
    found = {}
    for i in range(graph.num_layers):
        mod = graph.point(f"layers.{i}.queries").module
        g = inspect.unwrap(type(mod).forward).__globals__
        found[id(g)] = g.get("eager_attention_forward")
    return found


@pytest.mark.parametrize("name", [n for n in A.NAMES if _model_type(n) in UNSUPPORTED])
def test_unsupported_families_say_what_is_missing(name):
    model = A.build_tiny(name)
    for kind in ATTN:
        with pytest.raises(UnsupportedModelError, match="not supported for model_type") as e:
            get_value(model, A.tokens(), f"layers.0.{kind}")
        assert UNSUPPORTED[_model_type(name)] in str(e.value)
    assert not hook_ids(model)


# -- bad input -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return build("llama")


def _untouched(model, fn, error, match):
    before, registry = hook_ids(model), _attention_registry_state()
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error, match=match):
            fn()
    finally:
        handle.remove()
    assert not calls, "the model ran before the error"
    assert hook_ids(model) == before and _attention_registry_state() == registry


def test_head_index_out_of_range_names_the_valid_heads(llama):
    _untouched(llama, lambda: get_value(llama, BASE, Site("layers.0.keys", heads=[2])), SelectorError,
               r"2 key/value heads.*valid 0\.\.1")
    _untouched(llama, lambda: get_value(llama, BASE, Site("layers.0.values", heads=[3])), SelectorError,
               r"key/value heads")
    _untouched(llama, lambda: get_value(llama, BASE, Site("layers.0.queries", heads=[4])), SelectorError,
               r"4 heads.*valid 0\.\.3")
    _untouched(llama, lambda: get_value(llama, BASE, Site("layers.0.attention_pattern", heads=[9])),
               SelectorError, r"valid 0\.\.3")
    got = get_value(llama, BASE, Site("layers.0.keys", heads=[1]))  # kv head 1 exists
    assert next(iter(got.values())).shape == (2, 6, 1, 4)


def test_pattern_of_the_wrong_shape_is_refused_before_the_forward(llama):
    wrong = torch.zeros(2, 6, 4, 6)  # [b, q, heads, k]: not the pattern's [b, heads, q, k]
    _untouched(llama, lambda: set_value(llama, {"layers.0.attention_pattern": wrong}, inputs=BASE), ShapeError,
               r"\(2, 4, 6, 6\) \[batch, heads, query positions, key dims\]")
    sel = Site("layers.0.attention_pattern", heads=[1], positions=[2])
    _untouched(llama, lambda: set_value(llama, {sel: torch.zeros(2, 1, 6, 1)}, inputs=BASE), ShapeError,
               r"\(2, 1, 1, 6\)")


def test_pattern_dims_out_of_range_name_the_key_length(llama):
    site = Site("layers.0.attention_pattern", dims=[6])
    _untouched(llama, lambda: get_value(llama, BASE, site), SelectorError, r"size 6 \(valid 0\.\.5\)")
    q = Site("layers.0.queries", dims=[4])
    _untouched(llama, lambda: get_value(llama, BASE, q), SelectorError, r"size 4 \(valid 0\.\.3\)")


def test_registry_and_hooks_restored_after_an_exception(llama):
    before, registry, eager = hook_ids(llama), _attention_registry_state(), _eager_globals(llama)

    def boom(cur):
        raise RuntimeError("boom")

    for kind in ATTN:
        with pytest.raises(RuntimeError, match="boom"):
            set_value(llama, {f"layers.1.{kind}": boom}, inputs=BASE)
        with pytest.raises(RuntimeError, match="inside"):
            with set_value(llama, {f"layers.0.{kind}": Zero()}):
                raise RuntimeError("inside")
    assert hook_ids(llama) == before
    assert _attention_registry_state() == registry and _eager_globals(llama) == eager


def test_only_the_asked_layers_leave_the_fast_path(llama):
    """Reading layer 1's pattern runs the explicit softmax at layer 1 only (layer 0 stays on sdpa)."""
    from transformers.modeling_utils import AttentionInterface
    seen = []
    original = AttentionInterface._global_mapping["sdpa"]

    def spy(module, *args, **kwargs):
        seen.append(module.layer_idx)
        return original(module, *args, **kwargs)

    AttentionInterface._global_mapping["sdpa"] = spy
    try:
        get_value(llama, BASE, "layers.1.attention_pattern")
        assert seen == [0]  # layer 0 on sdpa, layer 1 explicit (and the forward stopped there)
        seen.clear()
        with set_value(llama, {"layers.0.queries": lambda q: q}):
            llama(BASE)
        assert seen == [0, 1]  # q/k/v taps keep the fast path
    finally:
        AttentionInterface._global_mapping["sdpa"] = original


def test_nested_blocks_compose(llama):
    """A read inside a `set_value` block sees the value set (the interceptions stack and unstack)."""
    x = BASE
    eye = torch.eye(6, dtype=torch.float64).expand(2, 4, 6, 6)
    registry = _attention_registry_state()
    with set_value(llama, {"layers.1.attention_pattern": eye}):
        got = get_value(llama, x, ["layers.1.attention_pattern", "layers.1.values", "layers.1.attention_heads"])
    torch.testing.assert_close(got["layers.1.attention_pattern"], eye)
    v = got["layers.1.values"].repeat_interleave(2, dim=2)
    torch.testing.assert_close(got["layers.1.attention_heads"], v, **TOL)
    assert _attention_registry_state() == registry


def test_attention_sites_follow_model_surgery():
    """After replacing a block's attention module, the sites act on the new module, not the old one."""
    import copy

    model = build("llama")
    x = BASE
    get_value(model, x, "layers.1.queries")  # build and cache the graph
    old = model.model.layers[1].self_attn
    model.model.layers[1].self_attn = copy.deepcopy(old)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(2.0)
    point = SiteGraph.from_model(model).point("layers.1.queries")
    assert point.module is model.model.layers[1].self_attn
    ref = oracles.forward(model, x)
    got = get_value(model, x, "layers.1.queries")["layers.1.queries"]
    torch.testing.assert_close(got, ref["layers.1.queries"], **TOL)
    zeroed = set_value(model, {"layers.1.attention_pattern": Zero()}, inputs=x).logits
    want = oracles.forward(model, x, {"layers.1.attention_pattern": torch.zeros_like})["logits"]
    torch.testing.assert_close(zeroed, want, **TOL)


def test_encoder_pattern_is_bidirectional_and_respects_padding():
    """BERT: no causal mask (sdpa passes None and the module is not causal), padding keys get no weight."""
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    model = tf.BertModel(config).double().eval()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    names = [f"layers.1.{k}" for k in ("values", "attention_pattern", "attention_heads")]
    for inputs, pad in ((BASE, False), ({"input_ids": BASE, "attention_mask": mask}, True)):
        v, p, z = (get_value(model, inputs, names)[n] for n in names)
        assert p.triu(1).abs().max() > 0  # later keys are attended to
        torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", p, v), z, **TOL)
        if pad:
            assert p[1, :, :, 4:].abs().max() == 0


def test_decoding_step_with_a_cache():
    """One new token after a cached prefix: the pattern is [b, heads, 1, prefix + 1] (sdpa passes no
    mask at q = 1: every cached key is allowed) and equals the last row of the uncached pattern."""
    model = build("llama")
    with torch.no_grad():
        prefix = model(BASE, use_cache=True).past_key_values
        step = tokens(2, 1, seed=5)
        p = get_value(model, {"input_ids": step, "past_key_values": prefix}, "layers.1.attention_pattern")
    p = p["layers.1.attention_pattern"]
    assert p.shape == (2, 4, 1, 7)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 1, dtype=p.dtype))
    ref = get_value(model, torch.cat([BASE, step], 1), "layers.1.attention_pattern")["layers.1.attention_pattern"]
    torch.testing.assert_close(p[:, :, 0], ref[:, :, -1], **TOL)
