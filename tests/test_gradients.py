"""Gradients through set values, through an interchange's source run, and into a DAS rotation.

Checked by finite differences in float64 (torch.autograd.gradcheck, or a central difference along a
random direction for parameters). GPT-2 is used: it computes in float64 throughout, whereas Llama's
RMSNorm upcasts to float32, which would drown finite differences in rounding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build, tokens
from torch.autograd import gradcheck

from interventions import LowRankRotatedSubspace, RotatedSubspace, Site, interchange, set_value


@pytest.fixture(scope="module")
def model():
    return build("gpt2")  # float64


BASE = tokens(1, 4, seed=31)
SOURCE = tokens(1, 4, seed=32)


def seeded(*shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def embeds(model, ids):
    return model.transformer.wte.weight[ids].detach()


@pytest.mark.parametrize("site", [
    Site("layers.0.attention_output", positions=[1, 3], dims=[0, 2, 5]),
    Site("layers.1.attention_heads", positions=[2], heads=[0, 3]),
    Site("logits", positions=[0], dims=slice(0, 3)),
], ids=str)
def test_gradcheck_through_a_set_value(model, site):
    shape = {"layers.0.attention_output": (1, 2, 3), "layers.1.attention_heads": (1, 1, 2, 4),
             "logits": (1, 1, 3)}[site.name]
    value = seeded(*shape, seed=1).requires_grad_()

    def fn(v):
        return set_value(model, {site: v}, inputs=BASE).logits

    assert gradcheck(fn, (value,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("in_batch", [False, True])
def test_gradcheck_through_the_source_run(model, in_batch):
    """d(output)/d(source embeddings) and d(output)/d(base embeddings) under an interchange."""
    base = embeds(model, BASE).clone().requires_grad_()
    source = (embeds(model, SOURCE) + 0.1 * seeded(1, 4, 16, seed=2)).requires_grad_()
    sites = [Site("layers.0.output", positions=[1, 2]), Site("layers.1.attention_heads", positions=[3], heads=[2])]

    def fn(b, s):
        return interchange(model, {"inputs_embeds": b}, {"inputs_embeds": s}, sites, in_batch=in_batch).logits

    assert gradcheck(fn, (base, source), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def directional_check(loss_fn, param: torch.Tensor, seed: int, eps: float = 1e-6, off_diagonal: bool = False):
    """Autograd's <grad, d> against a central difference of the scalar loss along a random d."""
    param.grad = None
    loss_fn().backward()
    grad = param.grad.detach().clone()
    direction = seeded(*param.shape, seed=seed)
    if off_diagonal:
        direction.diagonal().zero_()
    with torch.no_grad():
        param.add_(eps * direction)
        up = loss_fn().item()
        param.sub_(2 * eps * direction)
        down = loss_fn().item()
        param.add_(eps * direction)
    numeric = (up - down) / (2 * eps)
    analytic = float((grad * direction).sum())
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    param.grad = None
    return grad


def test_parameter_gradient_through_the_source_run(model):
    """With layers.1.input swapped wholesale, layer 0 reaches the output only through the source run."""
    weights = seeded(1, 4, 40, seed=3)
    param = model.transformer.h[0].mlp.c_fc.weight

    def loss():
        return (interchange(model, BASE, SOURCE, "layers.1.input").logits * weights).sum()

    grad = directional_check(loss, param, seed=4)
    assert grad.abs().sum() > 0
    # the base's own layer 0 is cut off, so the gradient is that of the plain source run
    model.zero_grad()
    (model(SOURCE).logits * weights).sum().backward()
    torch.testing.assert_close(grad, param.grad, rtol=1e-5, atol=1e-6)
    model.zero_grad()


@pytest.mark.parametrize("make", [lambda: RotatedSubspace(16, 4), lambda: LowRankRotatedSubspace(16, 3)],
                         ids=["full", "low-rank"])
def test_rotation_receives_a_gradient(model, make):
    torch.manual_seed(0)
    das = make().double()
    weights = seeded(1, 4, 40, seed=5)
    site = Site("layers.0.output", positions=[1, 2])

    def loss():
        return (interchange(model, BASE, SOURCE, site, intervention=das).logits * weights).sum()

    params = list(das.parameters())
    assert params
    loss().backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        # the Householder parametrisation (non-square) reads signs off the diagonal (piecewise
        # constant), so finite differences only hold off it
        directional_check(loss, p, seed=6, off_diagonal=True)
    model.zero_grad()
