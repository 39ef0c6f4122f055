"""Attention internals as sites: per-head queries, keys, values and the attention pattern.

Hugging Face attention modules hand (module, query, key, value, mask, **kwargs) to an attention
function: ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` or their modeling file's
``eager_attention_forward``. For the duration of a `hooked` block, `intercepted` wraps those
functions (every registry entry and the eager function of each hooked module's modeling file), so
that only the hooked modules see their q/k/v taps, and only modules with a pattern tap run the
explicit eager softmax (under the model's own mask, scaling and soft-capping); every other module
stays on its fast path. Everything is restored in ``finally``. A few families compute attention
inline instead (`METHOD_ROUTES`); those without any place to intercept are `UNSUPPORTED`.

Site layouts: queries [batch, seq, heads, head_dim] (after rotary / q-norm, before the score
scaling; OPT's folded-in scale is divided out), keys / values [batch, seq, kv_heads, head_dim],
attention_pattern [batch, heads, q, k] (post-softmax).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .errors import UnsupportedModelError

AttentionKind = Literal["queries", "keys", "values", "pattern"]
ATTENTION_KINDS: tuple[str, ...] = ("queries", "keys", "values", "pattern")
# canonical site suffix -> point kind, in computation order
SITE_KINDS: dict[str, AttentionKind] = {
    "queries": "queries", "keys": "keys", "values": "values", "attention_pattern": "pattern",
}
Tap = Callable[[torch.Tensor], "torch.Tensor | None"]


# -- per-family routes (declarative) ----------------------------------------------------------------
@dataclass(frozen=True)
class InterfaceRoute:
    """The module calls a transformers attention function with (module, q, k, v, mask, ...).

    query_scale: attribute of the module by which the query was already multiplied (OPT folds the
    score scaling into q and passes ``scaling=1.0``); the `queries` site divides it out.
    """

    query_scale: str | None = None


@dataclass(frozen=True)
class MethodRoute:
    """The module computes attention inline: q/k/v pass through a method, the pattern through a dropout.

    method: the module's method that receives (q, k, v, ...) as its first arguments ("args") or
    returns (q, k, v) ("returns"), each [batch, heads, seq, head_dim]; pattern_module: the dropout
    submodule applied to the post-softmax weights [batch, heads, q, k] before they mix the values.
    """

    method: str
    qkv: Literal["args", "returns"]
    pattern_module: str


Route = InterfaceRoute | MethodRoute

INTERFACE_OVERRIDES: dict[str, InterfaceRoute] = {"opt": InterfaceRoute(query_scale="scaling")}
METHOD_ROUTES: dict[str, MethodRoute] = {
    "gpt_neo": MethodRoute(method="_attn", qkv="args", pattern_module="attn_dropout"),
    "bloom": MethodRoute(method="_reshape", qkv="returns", pattern_module="attention_dropout"),
}
UNSUPPORTED: dict[str, str] = {
    "falcon": "FalconAttention calls torch's scaled_dot_product_attention (or an inline softmax) itself, with "
              "no attention function, method or module boundary around q/k/v or the weights",
    "mpt": "MptAttention splits q/k/v and applies softmax and dropout functionally inside forward, with no "
           "attention function, method or module boundary around them",
    "xglm": "XGLMAttention reshapes q/k/v and applies softmax and dropout functionally inside forward, with no "
            "attention function, method or module boundary around them",
}


@dataclass(frozen=True)
class AttentionSite:
    """One attention-internal site of a block: the attention module, the kind, and its head axis."""

    module: nn.Module
    kind: AttentionKind
    num_heads: int  # query heads (queries, pattern) or key/value heads (keys, values)
    head_dim: int | None  # width of the last axis (None for the pattern: the key length)
    route: Route


# -- finding the attention module of a block ------------------------------------------------------------
def _forward_names(module: nn.Module) -> tuple[str, ...]:
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code.co_names if code is not None else ()


def _calls_interface(module: nn.Module) -> bool:
    names = _forward_names(module)
    return "ALL_ATTENTION_FUNCTIONS" in names or "eager_attention_forward" in names


def _find(block: nn.Module, model_type: str | None) -> tuple[nn.Module, Route]:
    method = METHOD_ROUTES.get(model_type or "")
    for _, module in block.named_modules():
        if method is not None:
            if hasattr(type(module), method.method) and hasattr(module, method.pattern_module):
                return module, method
        elif _calls_interface(module):
            return module, INTERFACE_OVERRIDES.get(model_type or "", InterfaceRoute())
    raise UnsupportedModelError(
        f"no attention module found in {type(block).__name__} (model_type={model_type!r}): none of its submodules "
        "calls a transformers attention function (ALL_ATTENTION_FUNCTIONS / eager_attention_forward), so its "
        "queries, keys, values and attention_pattern cannot be reached."
    )


def _head_counts(module: nn.Module, config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of an attention module."""
    heads = (getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
             or getattr(config, "num_attention_heads", None))
    head_dim = getattr(module, "head_dim", None) or getattr(module, "head_size", None) or getattr(config, "head_dim", None)
    hidden = getattr(config, "hidden_size", None)
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    if heads is None or head_dim is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} does not say its number of heads or head_dim (no num_heads/head_dim "
            "attribute, nor config.num_attention_heads/head_dim), so its per-head sites cannot be shaped."
        )
    groups = getattr(module, "num_key_value_groups", None)
    kv = heads // groups if groups else getattr(config, "num_key_value_heads", None) or heads
    return int(heads), int(kv), int(head_dim)


def sites_of(block: nn.Module, config) -> dict[str, AttentionSite]:
    """The attention-internal sites of one block (suffix -> site); UnsupportedModelError if there are none."""
    model_type = getattr(config, "model_type", None)
    if model_type in UNSUPPORTED:
        raise UnsupportedModelError(
            f"attention-internal sites (queries, keys, values, attention_pattern) are not supported for "
            f"model_type={model_type!r}: {UNSUPPORTED[model_type]}. Its other sites work."
        )
    module, route = _find(block, model_type)
    heads, kv, head_dim = _head_counts(module, config)
    per = {"queries": (heads, head_dim), "keys": (kv, head_dim), "values": (kv, head_dim), "pattern": (heads, None)}
    return {suffix: AttentionSite(module, kind, *per[kind], route) for suffix, kind in SITE_KINDS.items()}


# -- taps: what the hooked modules do with their q/k/v and weights --------------------------------------
@dataclass
class _Taps:
    """The handlers installed on one attention module (site values in the site layouts)."""

    route: Route
    fns: dict[str, Tap] = field(default_factory=dict)

    def head_value(self, kind: str, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """Apply the `kind` handler to `t` [batch, heads, seq, head_dim] (shown as [batch, seq, heads, head_dim])."""
        fn = self.fns.get(kind)
        if fn is None:
            return t
        scale = None
        if kind == "queries" and isinstance(self.route, InterfaceRoute) and self.route.query_scale:
            scale = getattr(module, self.route.query_scale)
        view = t.transpose(1, 2)
        shown = view / scale if scale is not None else view
        new = fn(shown)
        if new is None or new is shown:
            return t
        return (new * scale if scale is not None else new).transpose(1, 2)

    def qkv(self, module, q, k, v):
        return (self.head_value("queries", module, q), self.head_value("keys", module, k),
                self.head_value("values", module, v))


def _repeat_kv(value: torch.Tensor, heads: int) -> torch.Tensor:
    groups = heads // value.shape[1]
    return value if groups == 1 else value.repeat_interleave(groups, dim=1)


def additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, module: nn.Module,
                  kwargs: dict) -> torch.Tensor | None:
    """The mask an eager softmax adds to the scores: from sdpa's boolean mask, or rebuilt where sdpa got None.

    Under sdpa, transformers passes None when the attention is purely causal (no padding, no active
    sliding window), relying on ``is_causal``: the causal mask is rebuilt here, aligned as sdpa's
    ``is_causal`` (top-left: where there are more keys than queries, the extra keys are the empty slots
    of a static cache that sdpa crops away).
    """
    lowest = torch.finfo(query.dtype).min
    if mask is None:
        q_len, k_len = query.shape[-2], key.shape[-2]
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if not causal or q_len == 1:
            return None
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
        mask = keep.view(1, 1, q_len, k_len)
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        return torch.where(mask, zero, torch.tensor(lowest, dtype=query.dtype, device=query.device))
    return mask.to(query.dtype)


def _mix(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weights [b, h, q, k] · values [b, kv, k, d] -> [b, q, h, d] (the attention functions' output layout)."""
    v = _repeat_kv(value, weights.shape[1])
    return torch.matmul(weights.to(v.dtype), v).transpose(1, 2).contiguous()


def _interface_wrapper(original: Callable, taps: dict[nn.Module, _Taps], eager_of: dict[nn.Module, Callable]):
    """`original` (an attention function), with the hooked modules' taps applied."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        tap = taps.get(module)
        if tap is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        query, key, value = tap.qkv(module, query, key, value)
        pattern = tap.fns.get("pattern")
        if pattern is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        mask = additive_mask(attention_mask, query, key, module, kwargs)
        out, weights = eager_of[module](module, query, key, value, mask, *args, **kwargs)
        new = pattern(weights)
        if new is None or new is weights:
            return out, weights
        return _mix(new, value), new

    return attention


def _method_wrapper(original: Callable, module: nn.Module, tap: _Taps, qkv: str):
    if qkv == "args":
        def method(query, key, value, *args, **kwargs):
            return original(*tap.qkv(module, query, key, value), *args, **kwargs)
    else:
        def method(*args, **kwargs):
            q, k, v = original(*args, **kwargs)
            return tap.qkv(module, q, k, v)
    return method


_MISSING = object()


@contextmanager
def _set_items(mapping: dict, new: dict):
    """Temporarily set `mapping[key] = value` for each item; restore (or delete) in finally."""
    saved = [(key, mapping.get(key, _MISSING)) for key in new]
    try:
        mapping.update(new)
        yield
    finally:
        for key, old in reversed(saved):
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old


@contextmanager
def _set_attr(obj, name: str, value):
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            obj.__dict__.pop(name, None)


def _registries(modeling_globals: list[dict]) -> list[dict]:
    """The dicts transformers looks attention functions up in: the class-wide mapping, and the own
    (local) mapping of the global registry and of any registry instance a modeling file defines."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    found = [AttentionInterface._global_mapping, ALL_ATTENTION_FUNCTIONS._local_mapping]
    for g in modeling_globals:
        local = getattr(g.get("ALL_ATTENTION_FUNCTIONS"), "_local_mapping", None)
        if isinstance(local, dict) and all(local is not d for d in found):
            found.append(local)
    return found


@contextmanager
def intercepted(items: list[tuple[AttentionSite, Tap]]):
    """Apply each (site, handler) at its attention module for the duration of the block."""
    taps: dict[nn.Module, _Taps] = {}
    for site, fn in items:
        taps.setdefault(site.module, _Taps(site.route)).fns[site.kind] = fn
    with ExitStack() as stack:
        interface = {m: t for m, t in taps.items() if isinstance(t.route, InterfaceRoute)}
        if interface:
            eager_of: dict[nn.Module, Callable] = {}
            globals_of: dict[int, dict] = {}
            for module in interface:
                g = inspect.unwrap(type(module).forward).__globals__
                if "eager_attention_forward" not in g and taps[module].fns.get("pattern") is not None:
                    raise UnsupportedModelError(
                        f"{type(module).__name__}'s modeling file has no eager_attention_forward, so its attention "
                        "pattern cannot be computed explicitly."
                    )
                eager_of[module] = g.get("eager_attention_forward")
                globals_of[id(g)] = g
            for g in globals_of.values():
                if "eager_attention_forward" in g:
                    wrapped = _interface_wrapper(g["eager_attention_forward"], interface, eager_of)
                    stack.enter_context(_set_items(g, {"eager_attention_forward": wrapped}))
            for registry in _registries(list(globals_of.values())):
                stack.enter_context(_set_items(registry, {
                    key: _interface_wrapper(fn, interface, eager_of) for key, fn in list(registry.items())}))
        for module, tap in taps.items():
            route = tap.route
            if not isinstance(route, MethodRoute):
                continue
            if any(k in tap.fns for k in ("queries", "keys", "values")):
                original = getattr(module, route.method)
                stack.enter_context(_set_attr(module, route.method, _method_wrapper(original, module, tap, route.qkv)))
            pattern = tap.fns.get("pattern")
            if pattern is not None:
                def on_weights(_, __, weights, fn=pattern):
                    new = fn(weights)
                    return None if new is None or new is weights else new
                handle = module.get_submodule(route.pattern_module).register_forward_hook(on_weights)
                stack.callback(handle.remove)
        yield
