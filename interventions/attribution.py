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

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InterventionError, ShapeError, UnsupportedModelError
from .gradients import Metric, value_and_grad
from .graph import SiteGraph
from .primitives import Inputs, _as_sites, _prepare, _shape, get_value
from .sites import Site

_QK = re.compile(r"layers\.(\d+)\.(queries|keys)")
PATTERN_TOL = 1e-4  # how closely softmax(scaling * q k^T + mask) must reproduce the model's pattern


def attribution_patching(
    model: nn.Module, base: Inputs, source: Inputs, sites, metric: Metric, *, qk_fix: bool = False
) -> dict[Site, torch.Tensor]:
    """Site -> ``((source value - base value) * d metric / d base value).sum(-1)``, detached.

    Shapes: [batch, positions] for residual-type sites, [batch, positions, heads] for per-head sites
    (with the site's selectors applied; dims are summed over the selected ones). `metric(logits) -> 0-dim
    tensor` is computed on the base run's logits (`iv.logits_of`), e.g. a mean logit difference.

    ``qk_fix=True`` (AtP*, Kramar et al. 2024) replaces the estimate at `layers.{i}.queries` and
    `layers.{i}.keys` sites: the attention pattern that patching one position's query (or key) of one
    head would give is recomputed exactly (softmax included), and only the step from the pattern to the
    metric is linearised: ``sum(d metric / d pattern * (patched pattern - pattern))``. Same shapes
    ([batch, positions, heads]; keys' heads are KV heads). Other sites keep the plain estimate.
    """
    requested = _as_sites(sites)
    b_shape, s_shape = _shape(base), _shape(source)
    if None not in b_shape + s_shape and b_shape != s_shape:
        raise ShapeError(
            f"base and source must have the same shape [batch, seq] (position-aligned prompt pairs), got "
            f"base {b_shape} and source {s_shape}."
        )
    fixed: dict[int, list[int]] = {}  # layer -> indices of the requested queries/keys sites
    if qk_fix:
        graph = SiteGraph.from_model(model)
        prepared = _prepare(graph, requested, base)
        for i, site in enumerate(prepared):
            match = _QK.fullmatch(site.name)
            if match:
                fixed.setdefault(int(match.group(1)), []).append(i)
                if site.dims is not None:
                    raise InterventionError(
                        f"qk_fix recomputes the pattern for whole query/key vectors; '{site.name}' has "
                        f"dims={site.dims} (drop dims, or use qk_fix=False)."
                    )
        if not fixed:
            raise InterventionError(
                "qk_fix=True corrects the estimate at queries and keys sites ('layers.{i}.queries', "
                f"'layers.{{i}}.keys'), and none of the sites {[str(s) for s in requested]} is one: add them."
            )
    extra_src = [Site(f"layers.{layer}.{kind}") for layer in fixed for kind in ("queries", "keys")]
    extra_base = extra_src + [Site(f"layers.{layer}.attention_pattern") for layer in fixed]
    with torch.no_grad():
        source_values = get_value(model, source, requested + extra_src)  # stops after the last site; no head
    result = value_and_grad(model, base, requested + extra_base, metric)
    out = {
        site: _contract(source_values[site], result.values[site], result.grads[site]) for site in requested
    }
    for layer, indices in fixed.items():
        exact = _QKFix(graph, layer, base, source_values, result)
        for i in indices:
            out[requested[i]] = exact.estimate(prepared[i])
    return out


def _contract(source: torch.Tensor, base: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The linear estimate, summed over the last (hidden or head_dim) axis."""
    return ((source.to(grad.dtype) - base) * grad).sum(-1)


class _QKFix:
    """AtP*'s QK fix for one layer: exact patterns for patched queries/keys, linear from the pattern on."""

    CHUNK = 1 << 24  # elements of the [batch, heads, keys, q, k] tensor of patched key patterns at a time

    def __init__(self, graph: SiteGraph, layer: int, base, source_values, result):
        name = f"layers.{layer}"
        self.q_b, self.k_b = (result.values[f"{name}.{k}"] for k in ("queries", "keys"))
        self.q_s, self.k_s = (source_values[f"{name}.{k}"].to(self.q_b.dtype) for k in ("queries", "keys"))
        self.pattern = result.values[f"{name}.attention_pattern"]  # [b, heads, q, k]
        self.grad = result.grads[f"{name}.attention_pattern"]
        _, seq, heads, head_dim = self.q_b.shape
        self.groups = heads // self.k_b.shape[2]
        module = graph.point(f"{name}.queries").module
        causal = bool(getattr(module, "is_causal", True))  # encoders (BERT) attend both ways
        kb = self._per_query_head(self.k_b)
        best = float("inf")  # the closest miss, for the message (NaN rows never count as close)
        for scores_of in _score_models(module, head_dim):  # the first that reproduces the model's pattern
            mask = _additive_mask(base, seq, self.q_b, causal, scores_of.window)  # [b or 1, 1, q, k]
            scores = scores_of(self.q_b, kb) + mask
            diff = float((torch.softmax(scores, -1) - self.pattern.to(scores.dtype)).abs().max())
            if diff <= PATTERN_TOL:  # NaN (a fully masked row) never passes
                self.score, self.mask, self.scores = scores_of, mask, scores
                break
            best = min(best, diff) if diff == diff else best
        else:
            raise UnsupportedModelError(
                "qk_fix recomputes the attention pattern as softmax(scores + causal/padding mask), with "
                "scores = scaling * q k^T (scaling: the module's, 1/sqrt(head_dim) or 1; optionally "
                f"soft-capped; optionally a sliding window); at {name} none of those reproduces "
                f"{type(graph.model).__name__}'s own pattern (closest: max |diff| {best:.2e}; ALiBi and "
                "other score biases are not modelled). "
                "Use qk_fix=False for this model."
            )
        self.clean = (self.grad * self.pattern).sum(-1)  # [b, heads, q]: the pattern's linear term per row

    def _per_query_head(self, kv: torch.Tensor) -> torch.Tensor:
        return kv if self.groups == 1 else kv.repeat_interleave(self.groups, dim=2)

    def estimate(self, site: Site) -> torch.Tensor:
        batch, seq = self.q_b.shape[:2]
        if site.positions is None:
            pos = torch.arange(seq).expand(batch, -1)
        elif isinstance(site.positions, tuple):
            pos = torch.tensor(site.positions).expand(batch, -1)
        else:
            pos = site.positions.long()
        pos = pos.to(self.q_b.device)
        est = (
            self._queries(pos) if site.name.endswith(".queries") else self._keys(pos)
        )  # [b, positions, heads]
        if site.heads is not None:
            est = est[:, :, torch.tensor(site.heads, device=est.device)]
        return est.detach()

    def _queries(self, pos: torch.Tensor) -> torch.Tensor:
        """Row p of the pattern recomputed with the source's query at p: [b, positions, heads]."""
        rows = lambda t: t.gather(2, pos[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
        q_new = self.q_s.gather(1, pos[:, :, None, None].expand(-1, -1, *self.q_s.shape[2:]))  # [b, P, h, d]
        scores = self.score(q_new, self._per_query_head(self.k_b))
        patched = torch.softmax(scores + rows(self.mask.expand(*self.scores.shape)), -1)
        est = (rows(self.grad) * patched).sum(-1) - self.clean.gather(
            2, pos[:, None].expand(-1, self.clean.shape[1], -1)
        )
        return est.transpose(1, 2)

    def _keys(self, pos: torch.Tensor) -> torch.Tensor:
        """Column p of the scores recomputed with the source's key at p: [b, positions, kv_heads]."""
        batch, heads, seq, _ = self.scores.shape
        k_new = self.k_s.gather(1, pos[:, :, None, None].expand(-1, -1, *self.k_s.shape[2:]))  # [b, P, kv, d]
        column = self.score(self.q_b, self._per_query_head(k_new))
        column = column + self.mask.expand(batch, -1, -1, -1).gather(
            3, pos[:, None, None, :].expand(-1, 1, seq, -1)
        )
        step = max(1, self.CHUNK // max(1, batch * heads * seq * seq))
        pieces = []
        for start in range(0, pos.shape[1], step):
            p = pos[:, start : start + step]  # [b, c]
            hit = torch.nn.functional.one_hot(p, seq).bool()[:, None, :, None, :]  # [b, 1, c, 1, k]
            scores = torch.where(
                hit, column[..., start : start + step].movedim(-1, 2)[..., None], self.scores[:, :, None]
            )  # [b, h, c, q, k]
            patched = torch.softmax(scores, -1)
            pieces.append((self.grad[:, :, None] * patched).sum((-1, -2)) - self.clean.sum(-1)[:, :, None])
        est = torch.cat(pieces, 2)  # [b, heads, P]
        est = est.view(batch, heads // self.groups, self.groups, -1).sum(2)  # query heads -> their KV head
        return est.transpose(1, 2)


@dataclass(frozen=True)
class _Scores:
    """Attention scores before the mask: ``scaling * q k^T``, soft-capped (Gemma 2) when `softcap` is set."""

    scaling: float
    softcap: float | None = None
    window: int | None = None  # sliding-window attention: a query sees the last `window` keys only

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [b, q, h, d], k [b, k, h, d] -> [b, h, q, k]."""
        scores = self.scaling * torch.einsum("bqhd,bkhd->bhqk", q, k)
        return scores if self.softcap is None else self.softcap * torch.tanh(scores / self.softcap)


def _score_models(module: nn.Module, head_dim: int) -> list[_Scores]:
    """Candidate score computations for an attention module, the module's own settings first."""
    config = getattr(module, "config", None)

    def options(*values):
        return list(dict.fromkeys(v for v in values if v is None or (isinstance(v, (int, float)) and v > 0)))

    scalings = [s for s in options(getattr(module, "scaling", None), head_dim**-0.5, 1.0) if s is not None]
    caps = options(getattr(module, "attn_logit_softcapping", None),
                   getattr(config, "attn_logit_softcapping", None), None)
    own_window = getattr(module, "sliding_window", None) if hasattr(module, "sliding_window") else None
    is_local = getattr(module, "attention_type", None) == "local"
    local = getattr(config, "window_size", None) if is_local else None
    windows = options(own_window, local, getattr(config, "sliding_window", None), None)  # local: GPT-Neo
    return [_Scores(float(s), c, w) for s in scalings for c in caps for w in windows]


def _additive_mask(inputs, seq: int, like: torch.Tensor, causal: bool = True,
                   window: int | None = None) -> torch.Tensor:
    """0 where a query may attend (causal, in the window, not padding), -inf elsewhere: [b or 1, 1, q, k]."""
    q_idx = torch.arange(seq, device=like.device)[:, None]
    k_idx = torch.arange(seq, device=like.device)[None, :]
    allowed = (k_idx <= q_idx) if causal else torch.ones(seq, seq, dtype=torch.bool, device=like.device)
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    allowed = allowed[None, None]
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        allowed = allowed & mask.to(like.device).bool()[:, None, None, :]
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(allowed, zero, torch.tensor(float("-inf"), dtype=like.dtype, device=like.device))
