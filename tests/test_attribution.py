"""`attribution_patching` against `value_and_grad`, against hand-written torch hooks + autograd (zero
perturbations added by raw `register_forward_hook`s, nothing from the library), and against real
patching (`interchange`): exact where the metric is linear in the site, second-order close otherwise."""

from __future__ import annotations

import pytest
import torch
from conftest import build, hook_ids, tokens
from einops import rearrange

import interventions as iv
from interventions import InterventionError, ShapeError, Site

BASE = tokens(4, 6, seed=51)
SOURCE = tokens(4, 6, seed=52)


def logit_diff(logits):
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


def test_equals_value_and_grad_on_base_and_get_value_on_source(tiny):
    sites = [Site("layers.0.output"), Site("layers.1.attention_heads", positions=[1, -1], heads=[0, 2]),
             Site("layers.1.mlp_output", dims=[0, 3, 5])]
    got = iv.attribution_patching(tiny, BASE, SOURCE, sites, logit_diff)
    vg = iv.value_and_grad(tiny, BASE, sites, logit_diff)
    src = iv.get_value(tiny, SOURCE, sites)
    for site in sites:
        want = ((src[site] - vg.values[site]) * vg.grads[site]).sum(-1)
        torch.testing.assert_close(got[site], want)
    assert got[sites[0]].shape == (4, 6)
    assert got[sites[1]].shape == (4, 2, 2)  # [batch, positions, heads]
    assert got[sites[2]].shape == (4, 6)
    assert got["layers.0.output"] is got[sites[0]]


def _handwritten(model, base, source, layers, metric):
    """Attribution of each layer's heads, MLP and residual output, with raw torch hooks on GPT-2's modules."""
    blocks = model.transformer.h

    def points(layer):  # (name, module, pre-hook?) ; heads are c_proj's input viewed per head
        b = blocks[layer]
        return [(f"layers.{layer}.attention_heads", b.attn.c_proj, True),
                (f"layers.{layer}.mlp_output", b.mlp, False), (f"layers.{layer}.output", b, False)]

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    heads = model.config.n_head
    src, handles = {}, []
    for layer in layers:
        for name, mod, pre in points(layer):
            if pre:
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, n=name: src.__setitem__(n, rearrange(a[0], "b s (h d) -> b s h d", h=heads))))
            else:
                handles.append(mod.register_forward_hook(lambda m, a, o, n=name: src.__setitem__(n, first(o))))
    with torch.no_grad():
        model(source)
    for h in handles:
        h.remove()
    handles.clear()
    base_vals, deltas = {}, {}
    for layer in layers:
        for name, mod, pre in points(layer):
            shape = src[name].shape
            deltas[name] = torch.zeros(shape, dtype=src[name].dtype, requires_grad=True)
            if pre:
                def hook(m, a, n=name):
                    base_vals[n] = rearrange(a[0], "b s (h d) -> b s h d", h=heads).detach()
                    return (a[0] + rearrange(deltas[n], "b s h d -> b s (h d)"),)
                handles.append(mod.register_forward_pre_hook(hook))
            else:
                def hook(m, a, o, n=name):
                    base_vals[n] = first(o).detach()
                    new = first(o) + deltas[n]
                    return (new, *o[1:]) if isinstance(o, tuple) else new
                handles.append(mod.register_forward_hook(hook))
    try:
        value = metric(model(base).logits)
    finally:
        for h in handles:
            h.remove()
    names = list(deltas)
    grads = torch.autograd.grad(value, [deltas[n] for n in names])
    return {n: ((src[n] - base_vals[n]) * g).sum(-1) for n, g in zip(names, grads)}


def test_equals_handwritten_hooks_and_autograd(gpt2):
    want = _handwritten(gpt2, BASE, SOURCE, range(2), logit_diff)
    before = hook_ids(gpt2)
    got = iv.attribution_patching(gpt2, BASE, SOURCE, list(want), logit_diff)
    assert hook_ids(gpt2) == before
    for name, w in want.items():
        torch.testing.assert_close(got[name], w)
        assert w.abs().max() > 1e-4, name  # a check that could fail


def test_exact_where_the_metric_is_linear_in_the_site(gpt2):
    """Patching the logits at one position changes a linear metric by exactly the linear estimate."""
    def metric(logits):  # linear in the logits of every position
        return (logits[:, :, 3] - 0.5 * logits[:, :, 7]).sum()

    got = iv.attribution_patching(gpt2, BASE, SOURCE, "logits", metric)["logits"]
    for b in range(BASE.shape[0]):
        clean = metric(iv.logits_of(gpt2(BASE[b:b + 1])))
        for p in range(BASE.shape[1]):
            patched = iv.interchange(gpt2, BASE[b:b + 1], SOURCE[b:b + 1], Site("logits", positions=[p]))
            torch.testing.assert_close(got[b, p], metric(iv.logits_of(patched)) - clean)


def test_second_order_close_to_real_patching_for_nearby_sources(gpt2):
    """For a source close to the base, |estimate - real effect| shrinks quadratically with the distance."""
    emb = gpt2.transformer.wte.weight[BASE[:1]].detach()
    direction = torch.randn(emb.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    site = Site("layers.0.output", positions=[2])
    errors = []
    for eps in (1e-2, 5e-3):
        base, source = {"inputs_embeds": emb}, {"inputs_embeds": emb + eps * direction}
        est = iv.attribution_patching(gpt2, base, source, site, logit_diff)[site][0, 0]
        real = logit_diff(iv.interchange(gpt2, base, source, site).logits) - logit_diff(gpt2(inputs_embeds=emb).logits)
        assert abs(real) > 1e-4
        errors.append(abs(est - real))
    assert errors[1] < errors[0] / 3  # second order: halving eps divides the error by ~4


def test_bad_inputs(gpt2):
    before = hook_ids(gpt2)
    with pytest.raises(ShapeError, match="same shape"):
        iv.attribution_patching(gpt2, BASE, SOURCE[:, :5], "layers.0.output", logit_diff)
    with pytest.raises(InterventionError, match="0-dim"):
        iv.attribution_patching(gpt2, BASE, SOURCE, "layers.0.output", lambda logits: logits[:, -1, 3])
    assert hook_ids(gpt2) == before
