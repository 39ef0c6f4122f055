"""`value_and_grad` against the hand-written oracle forwards: a zero perturbation added at each site
(tests/oracles.py), differentiated with autograd, gives the total derivative of the metric there."""

from __future__ import annotations

import dataclasses

import oracles
import pytest
import torch
from conftest import build, hook_ids, tokens

import interventions as iv
from interventions import InterventionError, Site, UnknownSiteError

BASE = tokens(3, 6, seed=41)


def logit_diff(logits):
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


def oracle_grads(model, ids, sites, metric):
    """d metric / d (each site's selection), by zero perturbations in the hand-written forward."""
    clean = oracles.forward(model, ids)
    deltas, edits = [], {}
    for site in sites:
        sel = dict(positions=site.positions, heads=site.heads, dims=site.dims)
        delta = torch.zeros_like(oracles.select(clean[site.name], **sel)).requires_grad_()
        deltas.append(delta)
        edits.setdefault(site.name, []).append(oracles.edit_at(lambda cur, d=delta: cur + d, **sel))
    out = oracles.forward(model, ids, edits)
    return metric(out["logits"]), torch.autograd.grad(metric(out["logits"]), deltas)


SITES = [
    Site("layers.0.output"),
    Site("layers.1.attention_heads", positions=[2, -1], heads=[1, 3]),
    Site("layers.0.mlp_output", dims=slice(2, 9)),
    Site("layers.1.input", positions=torch.tensor([[0, 5], [1, 2], [4, 3]])),
    Site("logits", positions=[-1]),
    # attention internals: queries [b, s, heads, d], keys/values [b, s, kv_heads, d], pattern [b, heads, q, k]
    Site("layers.0.queries", positions=[3], heads=[0, 2]),
    Site("layers.1.keys", heads=[1]),  # a KV head (Llama has 2)
    Site("layers.0.values"),
    Site("layers.1.attention_pattern"),
]


def test_values_and_total_derivatives_match_the_oracle(tiny):
    result = iv.value_and_grad(tiny, BASE, SITES, logit_diff)
    want_metric, want = oracle_grads(tiny, BASE, SITES, logit_diff)
    tol = dict(atol=1e-6, rtol=1e-5)  # Llama's RMSNorm normalises in float32
    torch.testing.assert_close(result.metric, want_metric.detach(), **tol)
    got_values = iv.get_value(tiny, BASE, SITES)
    for site, g in zip(SITES, want):
        torch.testing.assert_close(result.values[site], got_values[site])
        assert result.grads[site].shape == got_values[site].shape
        torch.testing.assert_close(result.grads[site], g, **tol)
        assert result.grads[site].abs().sum() > 0
    # whole sites also answer to their names
    assert result.grads["layers.0.output"] is result.grads[SITES[0]]
    assert not result.metric.requires_grad and result.metric.dim() == 0


def test_nested_sites_each_get_their_full_gradient(gpt2):
    """layers.0.output feeds layers.1.output: its gradient must include the paths through the later site."""
    sites = [
        Site("layers.0.attention_output"),
        Site("layers.0.output"),
        Site("layers.1.output"),
        Site("layers.1.output", positions=[1]),
    ]
    result = iv.value_and_grad(gpt2, BASE, sites, logit_diff)
    _, want = oracle_grads(gpt2, BASE, sites, logit_diff)
    for site, g in zip(sites, want):
        torch.testing.assert_close(result.grads[site], g)
    # each alone gives the same as all together (no site's gradient is cut short by another)
    alone = iv.value_and_grad(gpt2, BASE, [sites[0]], logit_diff)
    torch.testing.assert_close(alone.grads[sites[0]], result.grads[sites[0]])


def test_parameters_keep_grad_and_flags_and_no_hook_is_left():
    model = build("gpt2")
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)  # a grad the user already had (tied)
    before = hook_ids(model)
    iv.value_and_grad(model, BASE, ["layers.1.output", "layers.0.attention_heads"], logit_diff)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name, p in model.named_parameters():
        if p is model.lm_head.weight:
            assert torch.equal(p.grad, torch.ones_like(p))
        else:
            assert p.grad is None, name
    assert hook_ids(model) == before


def test_frozen_model_under_no_grad(gpt2):
    frozen = build("gpt2")
    for p in frozen.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        result = iv.value_and_grad(frozen, BASE, ["layers.0.output", "layers.1.mlp_output"], logit_diff)
    want = iv.value_and_grad(gpt2, BASE, ["layers.0.output", "layers.1.mlp_output"], logit_diff)
    for site in ("layers.0.output", "layers.1.mlp_output"):
        torch.testing.assert_close(result.grads[site], want.grads[site])


def test_result_is_frozen(gpt2):
    result = iv.value_and_grad(gpt2, BASE, "layers.0.output", logit_diff)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.metric = torch.tensor(0.0)
    with pytest.raises(TypeError):
        result.grads["layers.0.output"] = torch.zeros(1)


def test_a_metric_that_ignores_the_sites_has_zero_gradient(gpt2):
    result = iv.value_and_grad(gpt2, BASE, "layers.1.output", lambda logits: torch.tensor(2.0))
    assert torch.equal(result.grads["layers.1.output"], torch.zeros_like(result.values["layers.1.output"]))
    # the last position's logits do not depend on later positions' residual stream: zero there only
    r = iv.value_and_grad(gpt2, tokens(1, 6, 3), "layers.0.output", lambda l: l[0, 2, 1])
    assert (
        r.grads["layers.0.output"][:, 3:].abs().max() == 0
        and r.grads["layers.0.output"][:, :3].abs().max() > 0
    )


@pytest.mark.parametrize(
    "metric, match",
    [
        (lambda logits: logits[:, -1, 3], r"0-dim tensor .* shape \(3,\)"),
        (lambda logits: 1.5, "0-dim tensor .* float"),
        (lambda logits: logits[:, -1].argmax(-1).sum(), "floating-point"),
    ],
)
def test_a_metric_that_is_not_a_0dim_float_tensor_is_a_clear_error(gpt2, metric, match):
    before = hook_ids(gpt2)
    with pytest.raises(InterventionError, match=match):
        iv.value_and_grad(gpt2, BASE, "layers.0.output", metric)
    assert hook_ids(gpt2) == before


def test_no_hook_left_after_an_exception_in_the_metric_or_a_bad_site(gpt2):
    before = hook_ids(gpt2)

    def boom(logits):
        assert hook_ids(gpt2) == before  # the forward is over: hooks are already gone
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        iv.value_and_grad(gpt2, BASE, ["layers.0.output", "layers.1.attention_heads"], boom)
    with pytest.raises(UnknownSiteError, match="layers.1.output"):
        iv.value_and_grad(gpt2, BASE, "layers.1.outptu", logit_diff)
    with pytest.raises(InterventionError, match="callable"):
        iv.value_and_grad(gpt2, BASE, "layers.1.output", "logit_diff")
    assert hook_ids(gpt2) == before
