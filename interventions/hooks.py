"""The only code that touches torch hooks. `hooked` installs handlers on sites and always removes them.

Attention-internal sites (queries, keys, values, attention_pattern) go through
`attention.intercepted`, which wraps the attention functions for the block's duration.

A handler receives a site's whole value (head sites viewed as [batch, seq, heads, head_dim]) and
returns a replacement or None. With ``stop_after``, the forward is cut short by `StopForward` as
soon as every listed site has been seen, so no later layer and no output head runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterable, Union

import torch
from einops import rearrange

from . import attention
from .dispatch import release_offloaded, to_execution_device
from .graph import SiteGraph, SitePoint

Handler = Callable[[torch.Tensor], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; caught by `run_until`."""


def _main_key(output: Mapping):
    """A ModelOutput's main entry: 'logits' when present (with labels, 'loss' comes first), else the first."""
    return "logits" if "logits" in output else next(iter(output.keys()))


def _first(output):
    """A module's or model's main output tensor: the tensor itself, a ModelOutput's 'logits' (or first
    entry), or a tuple's first element. The one place that knows where outputs keep their tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # a Hugging Face ModelOutput (an OrderedDict)
        return output[_main_key(output)]
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return None


def _replace_first(output, new):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, Mapping):
        output[_main_key(output)] = new
        return output
    return (new, *output[1:]) if isinstance(output, tuple) else [new, *output[1:]]


def _input_key(args, kwargs):
    """Where a module's main input is: a positional index or a keyword (None when it got no tensor).
    The one place that knows where a module call keeps its hidden states."""
    if args and isinstance(args[0], torch.Tensor):
        return 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "hidden_states"
    return next((key for key, value in kwargs.items() if isinstance(value, torch.Tensor)), None)


def _main_input(args, kwargs) -> torch.Tensor | None:
    """A module call's main input tensor, or None."""
    key = _input_key(args, kwargs)
    return None if key is None else args[key] if isinstance(key, int) else kwargs[key]


def _unflattened(point: SitePoint, fn: Handler) -> tuple[Handler, list]:
    """For a value the model flattens to [batch*seq, ...] (OPT's MLP), show `fn` a [batch, seq, ...] view."""
    lead: list = []

    def record(module, args, kwargs):
        lead[:] = _main_input(args, kwargs).shape[:-1]

    def view_fn(value):
        new = fn(value.view(*lead, value.shape[-1]) if value.dim() == 2 and lead else value)
        return None if new is None else new.reshape(value.shape)

    return view_fn, [point.tokens_of.register_forward_pre_hook(record, with_kwargs=True)]


def _scaled(fn: Handler, scale: float) -> Handler:
    """Show `fn` the value times `scale` (Granite's residual multiplier); write back its result / scale."""
    def scaled_fn(value):
        shown = value * scale
        new = fn(shown)
        return None if new is None or new is shown else new / scale
    return scaled_fn


def _carried(fn: Handler, point: SitePoint) -> tuple[Handler, list]:
    """A write at an input that the block also keeps as its residual: shift the block's output by the delta.

    The residual between the sublayers is both the pre-MLP norm's input and what the block adds the MLP
    output to; the pre-hook rewrites the first, the (first-run) output hook moves the second by the same amount.
    """
    delta: list = []

    def carry_fn(value):
        new = fn(value)
        if new is not None and new is not value:
            delta[:] = [new - value]
        return new

    def shift(module, args, output):
        if not delta:
            return None
        d = delta.pop()
        out = _first(output)
        return _replace_first(output, out + d.reshape(out.shape))

    return carry_fn, [point.carry_to.register_forward_hook(shift, prepend=True)]


def _make_hook(point: SitePoint, fn: Handler) -> list:
    """Install `fn` at `point`; returns the hook handles."""
    extra = []
    if point.scale is not None:
        fn = _scaled(fn, point.scale)
    if point.carry_to is not None:
        fn, more = _carried(fn, point)
        extra += more
    if point.tokens_of is not None:
        fn, more = _unflattened(point, fn)
        extra += more
    if point.kind == "output":
        copy = point.copy

        def hook(module, args, output):
            value = _first(output)
            new = fn(value)
            if copy:  # the model adds into this tensor in place next: keep what the handlers saw intact
                new = (value if new is None else new).clone()
            return None if new is None else _replace_first(output, new)
        return extra + [point.module.register_forward_hook(hook)]

    heads = point.num_heads if point.kind == "heads" else None

    def pre_hook(module, args, kwargs):
        key = _input_key(args, kwargs)
        if key is None:
            raise RuntimeError(f"hooked module {type(module).__name__} received no tensor input")
        value = args[key] if isinstance(key, int) else kwargs[key]
        value = to_execution_device(module, value)  # where accelerate would move it (dispatch.py)
        if heads is not None:
            value = rearrange(value, "... (h d) -> ... h d", h=heads)
        new = fn(value)
        if new is None:
            return None
        if heads is not None:
            new = rearrange(new, "... h d -> ... (h d)")
        if isinstance(key, int):
            return (new, *args[1:]), kwargs
        return args, {**kwargs, key: new}

    return extra + [point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)]


def cache_length(kwargs: Mapping) -> int:
    """Tokens already in the key/value cache of a model call (0 for a plain call), from its keyword arguments.

    Read from ``cache_position`` where given, else from the cache object (``cache`` / ``past_key_values``:
    a transformers `Cache` or a legacy tuple of per-layer (key, value) pairs).
    """
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])
    return 0


def _new_tokens(args, kwargs) -> int | None:
    """How many tokens a model call computes: the sequence axis of its input ids / embeddings, if known."""
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[1]
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return args[0].shape[1]
    return None


OnForward = Callable[[int, "int | None"], None]


@contextmanager
def hooked(graph: SiteGraph, handlers: Mapping[str, Iterable[Handler]], stop_after: Iterable[str] = (),
           on_forward: OnForward | None = None):
    """Install `handlers` (site name -> handlers applied in order) for the duration of the block.

    `on_forward(cached, new)`, if given, runs at the start of every call of the model (before any site):
    `cached` tokens are in its key/value cache, `new` (None if unknown) are computed by this call.
    """
    pending = set(stop_after)
    handles = []

    def for_site(name: str, fns: list[Handler]):
        def fn(value):
            for f in fns:
                new = f(value)
                if new is not None:
                    value = new
            if name in pending:
                pending.discard(name)
                if not pending:
                    raise StopForward
            return value if fns else None
        return fn

    names = list(handlers) + [n for n in pending if n not in handlers]
    points = {name: graph.point(name) for name in names}  # resolve all first: errors before any hook
    inside = [(attention.AttentionSite(p.module, p.kind, p.num_heads, p.width, p.route),
               for_site(name, list(handlers.get(name, ()))))
              for name, p in points.items() if p.kind in attention.ATTENTION_KINDS]
    try:
        if on_forward is not None:
            # an encoder-decoder's inputs do not say how long its decoder's sequence is: no length then
            sized = not getattr(getattr(graph.model, "config", None), "is_encoder_decoder", False)
            handles.append(graph.model.register_forward_pre_hook(
                lambda module, args, kwargs: on_forward(cache_length(kwargs), _new_tokens(args, kwargs) if sized
                                                        else None),
                with_kwargs=True))
        with ExitStack() as stack:
            for name in names:
                if points[name].kind not in attention.ATTENTION_KINDS:
                    handles.extend(_make_hook(points[name], for_site(name, list(handlers.get(name, ())))))
            if inside:  # queries / keys / values / attention_pattern: attention.py's interception
                stack.enter_context(attention.intercepted(inside))
            yield
    except BaseException:
        release_offloaded(graph.model)  # a forward cut short keeps accelerate's offloaded weights loaded
        raise
    finally:
        for h in handles:
            h.remove()


#: A model's inputs: a tensor (its first argument) or a mapping of keyword arguments (a BatchEncoding).
Inputs = Union[torch.Tensor, Mapping]  # noqa: UP007 (a runtime alias)


def call(model, inputs: Inputs):
    """Call `model` on `inputs`: a tensor (first argument) or a mapping of keyword arguments."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def run_until(model, inputs, graph: SiteGraph, handlers: Mapping[str, Iterable[Handler]],
              stop_after: Iterable[str]):
    """Run `model` with `handlers` installed, stopping once every site in `stop_after` was seen."""
    stop_after = list(stop_after)
    with hooked(graph, handlers, stop_after):
        try:
            return call(model, inputs)
        except StopForward:
            release_offloaded(model)  # the forward ended inside a module: see dispatch.py
            return None
