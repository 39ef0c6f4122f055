"""`value_and_grad`: a metric of the logits and its gradient at named sites, one forward and one backward.

Each site's value is captured inside its hook and the forward continues from that very tensor, so
`torch.autograd.grad(metric, values)` gives total derivatives (a site nested inside another gets its
full gradient, paths through the later site included). Only the site values are differentiated:
parameters' `.grad` and `requires_grad` flags are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from .errors import InterventionError
from .graph import SiteGraph
from .hooks import Handler, call, hooked
from .metrics import logits_of
from .primitives import Inputs, _as_sites, _check_selectors, _prepare
from .sites import Site, select

Metric = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ValueAndGrad:
    """The metric (0-dim, detached) and, per requested site, its value and d metric / d value.

    `values` and `grads` are keyed by `Site` (a whole site also by its name); each entry has the shape
    of `get_value`'s selection for that site. Both are detached.
    """

    metric: torch.Tensor
    values: Mapping[Site, torch.Tensor]
    grads: Mapping[Site, torch.Tensor]


def check_metric(value, what: str = "metric") -> torch.Tensor:
    """Raise unless a metric returned a 0-dim tensor (what `torch.autograd.grad` can start from)."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        got = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise InterventionError(
            f"{what}(logits) must return a 0-dim tensor (e.g. a mean logit difference: reduce over the "
            f"batch with .mean() or .sum()), got {got}."
        )
    if not value.dtype.is_floating_point and not value.dtype.is_complex:
        raise InterventionError(
            f"{what}(logits) must return a floating-point tensor, got dtype {value.dtype}."
        )
    return value


def capture_with_grad(
    graph: SiteGraph, sites: list[Site]
) -> tuple[dict[str, list[Handler]], dict[str, torch.Tensor]]:
    """Handlers that keep each site's whole value as a node of the autograd graph (a leaf if it had none).

    The returned value is the one the forward continues from, so gradients at it are total derivatives.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, named: list[Site]):
        def handler(full: torch.Tensor):
            for site in named:
                _check_selectors(site, full)
            # A new tensor object that the forward continues from (a site that gets its input back
            # unchanged may keep computing from the original instead): a free alias, or a fresh leaf
            # where nothing upstream needs grad (frozen model, token inputs).
            full = full.view_as(full) if full.requires_grad else full.detach().requires_grad_()
            captured[name] = full
            return full

        return handler

    by_name: dict[str, list[Site]] = {}
    for site in sites:
        by_name.setdefault(site.name, []).append(site)
    return {name: [keep(name, named)] for name, named in by_name.items()}, captured


def value_and_grad(model: nn.Module, inputs: Inputs, sites, metric: Metric) -> ValueAndGrad:
    """``metric(logits_of(model(inputs)))`` and its gradient with respect to each site's (selected) value.

    One forward and one backward (`torch.autograd.grad` on the site values only, so no parameter's
    `.grad` changes); the hooks are removed even when `metric` raises. Works under `torch.no_grad()`.
    """
    if not callable(metric):
        raise InterventionError(f"metric must be a callable metric(logits) -> 0-dim tensor, got {metric!r}")
    graph = SiteGraph.from_model(model)
    requested = _as_sites(sites)
    prepared = _prepare(graph, requested, inputs)
    handlers, captured = capture_with_grad(graph, prepared)
    with torch.enable_grad():
        with hooked(graph, handlers):
            output = call(model, inputs)
        missing = sorted({s.name for s in prepared} - set(captured))
        if missing:
            raise InterventionError(
                f"sites {missing} were not reached by the forward pass (is the module used?)"
            )
        value = check_metric(metric(logits_of(output)))
        names = list(captured)
        if value.requires_grad:
            grads = torch.autograd.grad(value, [captured[n] for n in names], allow_unused=True)
        else:  # the metric does not depend on the model's computation at all
            grads = [None] * len(names)
    full_grads = {n: (g if g is not None else torch.zeros_like(captured[n])) for n, g in zip(names, grads)}
    values, out_grads = {}, {}
    for asked, site in zip(requested, prepared):
        layout = graph.point(site.name).layout  # attention_pattern: heads on axis 1, query positions on 2
        values[asked] = select(captured[site.name].detach(), site, layout)
        out_grads[asked] = select(full_grads[site.name], site, layout)
    return ValueAndGrad(value.detach(), MappingProxyType(values), MappingProxyType(out_grads))
