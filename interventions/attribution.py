"""Attribution patching: the first-order (linear) estimate of every site's activation-patching effect.

For a site with base value b, source value s and gradient g = d metric / d b on the base run, patching
s into the base changes the metric by about ``((s - b) * g).sum(-1)`` (Nanda 2023; Syed et al. 2023):
one value per example and position (and head, for per-head sites), from one source forward (no grad,
stopped after the last site) plus one base forward and backward, whatever the number of sites.
The estimate is exact for a metric linear in the site (e.g. the last layer's residual stream with a
logit-difference metric and no final norm) and fails where the model is far from linear between the
two values, notably saturated attention softmaxes (docs/workflows.md).
"""

from __future__ import annotations

from torch import nn
import torch

from .errors import ShapeError
from .gradients import Metric, value_and_grad
from .primitives import Inputs, _as_sites, _shape, get_value
from .sites import Site


def attribution_patching(model: nn.Module, base: Inputs, source: Inputs, sites, metric: Metric) -> dict[Site, torch.Tensor]:
    """Site -> ``((source value - base value) * d metric / d base value).sum(-1)``, detached.

    Shapes: [batch, positions] for residual-type sites, [batch, positions, heads] for per-head sites
    (with the site's selectors applied; dims are summed over the selected ones). `metric(logits) -> 0-dim
    tensor` is computed on the base run's logits (`iv.logits_of`), e.g. a mean logit difference.
    """
    requested = _as_sites(sites)
    b_shape, s_shape = _shape(base), _shape(source)
    if None not in b_shape + s_shape and b_shape != s_shape:
        raise ShapeError(
            f"base and source must have the same shape [batch, seq] (pairs of prompts, position-aligned), got "
            f"base {b_shape} and source {s_shape}."
        )
    with torch.no_grad():
        source_values = get_value(model, source, requested)  # stops after the last site; no head
    result = value_and_grad(model, base, requested, metric)
    return {site: _contract(source_values[site], result.values[site], result.grads[site]) for site in requested}


def _contract(source: torch.Tensor, base: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The linear estimate, summed over the last (hidden or head_dim) axis."""
    return ((source.to(grad.dtype) - base) * grad).sum(-1)
