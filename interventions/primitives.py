"""The three primitives: `get_value`, `set_value`, `interchange` (gradients flow through all three).

Every argument is validated before the model is touched; hooks live only inside `hooks.hooked`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Callable, Union

import torch
from torch import nn

from .errors import InterventionError, SelectorError, ShapeError
from .graph import HEAD_KINDS, SiteGraph, check_dims
from .hooks import Handler, Inputs, cache_length, call, hooked, run_until
from .sites import Layout, Site, SiteLike, as_site, select, write

Value = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


# -- inputs -------------------------------------------------------------------------------------
def _main_tensor(inputs: Inputs) -> torch.Tensor | None:
    if isinstance(inputs, torch.Tensor):
        return inputs
    if not isinstance(inputs, Mapping):
        raise InterventionError(
            f"model inputs must be a tensor or a mapping of keyword arguments (e.g. a tokenizer's "
            f"BatchEncoding), got {type(inputs).__name__}"
        )
    for key in ("input_ids", "inputs_embeds", "x", "input"):
        if isinstance(inputs.get(key), torch.Tensor):
            return inputs[key]
    return next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)


def _shape(inputs: Inputs) -> tuple[int | None, int | None]:
    """(batch, seq_len) of the inputs, where they can be read off."""
    t = _main_tensor(inputs)
    if t is None or t.dim() == 0:
        return None, None
    return t.shape[0], (t.shape[1] if t.dim() >= 2 else None)


def _as_sites(sites) -> list[Site]:
    if isinstance(sites, (str, Site)):
        return [as_site(sites)]
    if not isinstance(sites, Sequence) or not sites:
        raise InterventionError(f"sites must be a site, or a non-empty list of sites, got {sites!r}")
    return [as_site(s) for s in sites]


def _normalise_positions(site: Site, batch: int | None, seq_len: int | None, attention_mask) -> Site:
    """Check positions against the inputs; turn negative ints into absolute ones."""
    pos = site.positions
    if pos is None or seq_len is None:
        return site
    if isinstance(pos, tuple):
        bad = [p for p in pos if not -seq_len <= p < seq_len]
        if bad:
            raise SelectorError(
                f"positions {bad} out of range for '{site.name}': the inputs have {seq_len} positions "
                f"(valid 0..{seq_len - 1}, or negative from the end)."
            )
        absolute = tuple(p % seq_len for p in pos)
        site = site.with_positions(absolute) if absolute != pos else site
        index = torch.tensor(absolute).expand(batch or 1, -1)
    else:
        if batch is not None and pos.shape[0] != batch:
            raise SelectorError(
                f"per-example positions for '{site.name}' have {pos.shape[0]} rows; the inputs have batch "
                f"size {batch} (one row of positions per example)."
            )
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= seq_len):
            raise SelectorError(
                f"positions out of range for '{site.name}': got values in [{int(pos.min())}, "
                f"{int(pos.max())}], the inputs have {seq_len} positions (valid 0..{seq_len - 1})."
            )
        index = pos
    if attention_mask is not None and attention_mask.dim() == 2:
        on_pad = attention_mask.gather(1, index.to(attention_mask.device).long()) == 0
        if bool(on_pad.any()):
            rows, cols = torch.nonzero(on_pad, as_tuple=True)
            where = ", ".join(f"example {int(r)} position {int(index[r, c])}" for r, c in zip(rows[:5], cols[:5]))
            raise SelectorError(
                f"positions on padding for '{site.name}' ({where}): the attention mask is 0 there. "
                "Choose positions where attention_mask == 1."
            )
    return site


def _prepare(graph: SiteGraph, sites: list[Site], inputs: Inputs | None) -> list[Site]:
    batch, seq_len = _shape(inputs) if inputs is not None else (None, None)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    out = []
    for site in sites:
        point = graph.check(site)
        if point.kind == "pattern" and site.dims is not None and seq_len is not None:
            check_dims(site, seq_len)  # the pattern's last axis is the key axis: as long as the inputs
        out.append(_normalise_positions(site, batch, seq_len, mask))
    return out


def _selected_shape(site: Site, shape, layout: Layout = Layout.TOKENS) -> tuple:
    """The shape of `site`'s selection of a value of `shape`."""
    idx = site.index(shape, "cpu", layout)
    return tuple(shape) if idx is None else tuple(torch.broadcast_shapes(*(i.shape for i in idx)))


def _require_shape(site: Site, value: torch.Tensor, expected: tuple, layout: Layout = Layout.TOKENS) -> None:
    got = tuple(value.shape)
    if got != expected and not (len(got) == len(expected) and got[0] == 1 and got[1:] == expected[1:]):
        axes = "[batch, heads, query positions, key dims]" if layout == Layout.PATTERN else \
            "[batch, positions, (heads,) dims]"
        raise ShapeError(
            f"value for '{site.name}' has shape {got}; the site (with its selectors) has shape {expected} "
            f"{axes} (a batch of 1 broadcasts)."
        )


def _check_selectors(site: Site, full: torch.Tensor) -> None:
    """Raise unless `site`'s positions and dims fit a value of `full`'s shape (known only at hook time)."""
    if full.dim() == 2 and site.positions is not None:
        raise SelectorError(
            f"positions given for '{site.name}', whose value has no sequence axis (shape {tuple(full.shape)})."
        )
    if site.dims is not None:
        check_dims(site, full.shape[-1])


def _check_value(site: Site, full: torch.Tensor, value: torch.Tensor, layout: Layout = Layout.TOKENS) -> None:
    """Raise unless `value` fits `site`'s selection of `full` (batch may broadcast from 1)."""
    _check_selectors(site, full)
    _require_shape(site, value, _selected_shape(site, full.shape, layout), layout)


def _precheck_value(graph: SiteGraph, site: Site, value: torch.Tensor, batch: int, seq_len: int) -> None:
    """Check a tensor value's shape before any forward, where the site's shape is known in advance."""
    point = graph.point(site.name)
    if point.width is None or point.is_model_output:
        return  # module sites and logits: checked when the value is reached
    shape = [batch, seq_len] + ([point.num_heads] if point.kind in HEAD_KINDS else []) + [point.width]
    _require_shape(site, value, _selected_shape(site, shape, point.layout), point.layout)


def _precheck_pattern(graph: SiteGraph, site: Site, value: torch.Tensor, batch: int, seq_len: int) -> None:
    """Check a pattern value [batch, heads, q, k] before any forward (k = q: no key/value cache)."""
    point = graph.point(site.name)
    shape = [batch, point.num_heads, seq_len, seq_len]
    if site.dims is not None:
        check_dims(site, seq_len)
    _require_shape(site, value, _selected_shape(site, shape, point.layout), point.layout)


class _Tokens:
    """Where the current forward's tokens sit in the full sequence: `cached` in the key/value cache before them."""

    def __init__(self, sites: Sequence[Site]):
        self.sites = sites
        self.cached = 0

    def on_forward(self, cached: int, new: int | None) -> None:
        """At each model call, before any site: note the cache length; check positions on the full length."""
        self.cached = cached
        if new is None:
            return
        total = cached + new
        for site in self.sites:
            if isinstance(site.positions, torch.Tensor) and cached:
                raise SelectorError(
                    f"per-example positions for '{site.name}' under a key/value cache ({cached} cached tokens) are "
                    "not supported; use a list of ints (they index the full sequence, cached tokens included)."
                )
            if isinstance(site.positions, tuple):
                bad = [p for p in site.positions if not -total <= p < total]
                if bad:
                    raise SelectorError(
                        f"positions {bad} out of range for '{site.name}': the sequence has {total} positions "
                        f"({cached} in the key/value cache, {new} computed in this call; valid 0..{total - 1}, "
                        "or negative from the end)."
                    )

    def here(self, site: Site, length: int) -> tuple[Site | None, list[int] | None]:
        """`site` with its positions in this forward's own tokens (None if all lie in the cache), and which of
        the selected positions are kept (None: all). Non-negative positions index the full sequence, negative
        ones count back from its end; a position in the cache was set when it was computed, so it is skipped."""
        pos = site.positions
        if not isinstance(pos, tuple):
            return site, None
        total = self.cached + length
        absolute = [p if p >= 0 else total + p for p in pos]
        bad = [p for p, a in zip(pos, absolute) if not 0 <= a < total]
        if bad:
            raise SelectorError(
                f"positions {bad} out of range for '{site.name}': the sequence has {total} positions "
                f"({self.cached} in the key/value cache; valid 0..{total - 1}, or negative from the end)."
            )
        keep = [k for k, a in enumerate(absolute) if a >= self.cached]
        if not keep:
            return None, None
        local = tuple(absolute[k] - self.cached for k in keep)
        return (site if local == pos else site.with_positions(local)), (keep if len(keep) < len(pos) else None)


def _setter(site: Site, value: Value, layout: Layout = Layout.TOKENS, tokens: _Tokens | None = None) -> Handler:
    axis = layout.positions

    def handler(full: torch.Tensor):
        here, keep = (site, None) if tokens is None or full.dim() < 3 else tokens.here(site, full.shape[axis])
        if here is None:
            return None  # every selected position lies in the key/value cache: set when it was computed
        if callable(value):
            new = value(select(full, here, layout))
        elif keep is None or value.dim() <= axis:
            new = value
        else:
            new = value.index_select(axis, torch.tensor(keep, device=value.device))
        _check_value(here, full, new, layout)
        return write(full, here, new, layout)
    return handler


# -- get_value ----------------------------------------------------------------------------------
def get_value(model: nn.Module, inputs: Inputs, sites) -> dict[Site, torch.Tensor]:
    """Each requested site's value on `inputs`; the forward stops right after the last one.

    Returns a dict keyed by `Site` (a whole site also answers to its name: ``out["layers.2.output"]``).
    """
    graph = SiteGraph.from_model(model)
    requested = _as_sites(sites)
    prepared = _prepare(graph, requested, inputs)
    found: dict[Site, torch.Tensor] = {}
    by_name: dict[str, list[tuple[Site, Site]]] = {}
    for asked, site in zip(requested, prepared):
        by_name.setdefault(site.name, []).append((asked, site))

    def reader(pairs, layout):
        def handler(full):
            for asked, site in pairs:
                _check_selectors(site, full)
                found[asked] = select(full, site, layout)
        return handler

    handlers = {name: [reader(pairs, graph.point(name).layout)] for name, pairs in by_name.items()}
    run_until(model, inputs, graph, handlers, stop_after=handlers.keys())
    missing = [s for s in requested if s not in found]
    if missing:
        raise InterventionError(
            f"sites {[str(s) for s in missing]} were not reached by the forward pass (is the module used?)"
        )
    return found


# -- set_value ----------------------------------------------------------------------------------
def _setters(graph: SiteGraph, values: Mapping[SiteLike, Value], inputs=None) -> tuple[dict[str, list[Handler]], _Tokens]:
    if not isinstance(values, Mapping) or not values:
        raise InterventionError("values must be a non-empty mapping from sites to tensors (or callables)")
    if isinstance(inputs, Mapping) and cache_length(inputs) > 0:
        inputs = None  # positions index the full sequence, cache included: checked at the call
    sites = _prepare(graph, [as_site(s) for s in values], inputs)
    tokens = _Tokens(sites)
    batch, seq_len = _shape(inputs) if inputs is not None else (None, None)
    handlers: dict[str, list[Handler]] = {}
    for site, value in zip(sites, values.values()):
        if not (isinstance(value, torch.Tensor) or callable(value)):
            raise InterventionError(
                f"value for '{site.name}' must be a tensor or a callable (e.g. an Intervention), "
                f"got {type(value).__name__}"
            )
        point = graph.point(site.name)
        if isinstance(value, torch.Tensor) and batch is not None and seq_len is not None:
            if point.kind == "pattern":
                _precheck_pattern(graph, site, value, batch, seq_len)
            else:
                _precheck_value(graph, site, value, batch, seq_len)
        handlers.setdefault(site.name, []).append(_setter(site, value, point.layout, tokens))
    return handlers, tokens


@contextmanager
def _setting(model, graph, handlers, tokens):
    with hooked(graph, handlers, on_forward=tokens.on_forward):
        yield model


def set_value(model: nn.Module, values: Mapping[SiteLike, Value], inputs: Inputs | None = None):
    """Fix sites to values: ``with set_value(model, {site: tensor}): model(x)``.

    A value is a tensor shaped like the site's selection (batch 1 broadcasts) or a callable
    ``f(current) -> new`` (e.g. `Zero()`, `Add(v)`). Given `inputs`, runs the model once and returns
    its output instead of a context manager. Gradients flow through the values and the model.

    Positions under a key/value cache (``model.generate``): non-negative positions index the full
    sequence, cached tokens included; one that lies in the cache at a decode step is skipped (its value
    was set when it was computed); negative ones count back from the end, so ``positions=[-1]`` sets
    each newly computed token once. A position at or beyond the full length raises SelectorError at
    the call, before anything is written.
    """
    graph = SiteGraph.from_model(model)
    handlers, tokens = _setters(graph, values, inputs)
    if inputs is None:
        return _setting(model, graph, handlers, tokens)
    with hooked(graph, handlers, on_forward=tokens.on_forward):
        return call(model, inputs)


# -- interchange --------------------------------------------------------------------------------
def _is_input(x) -> bool:
    return isinstance(x, (torch.Tensor, Mapping))


def _groups(sources, sites, source_sites, intervention):
    """Normalise to one (source, base sites, source sites, interventions) tuple per source."""
    if _is_input(sources):
        sources = [sources]
        sites, source_sites = [sites], [source_sites] if source_sites is not None else None
        intervention = [intervention]
    else:
        if not isinstance(sources, Sequence) or not sources or not all(_is_input(s) for s in sources):
            raise InterventionError("sources must be one model input, or a non-empty list of model inputs")
        for what, obj in (("sites", sites), ("source_sites", source_sites)):
            if obj is not None and (not isinstance(obj, Sequence) or isinstance(obj, str) or len(obj) != len(sources)):
                raise InterventionError(
                    f"with {len(sources)} sources, {what} must be a list of {len(sources)} entries "
                    f"(one site or list of sites per source), got {obj!r}"
                )
        if not isinstance(intervention, Sequence):
            intervention = [intervention] * len(sources)
        elif len(intervention) != len(sources):
            raise InterventionError(f"give one intervention per source ({len(sources)}), got {len(intervention)}")
    groups = []
    for g, source in enumerate(sources):
        base_sites = _as_sites(sites[g])
        src_sites = _as_sites(source_sites[g]) if source_sites is not None else base_sites
        if len(src_sites) != len(base_sites):
            raise InterventionError(
                f"source_sites must pair one-to-one with sites: got {len(src_sites)} source sites for "
                f"{len(base_sites)} base sites"
            )
        groups.append((source, base_sites, src_sites, intervention[g]))
    return groups


def _check_pairing(base_site: Site, src_site: Site, base_len, src_len) -> None:
    nb = base_site.num_positions(base_len) if base_len is not None else None
    ns = src_site.num_positions(src_len) if src_len is not None else None
    if nb is not None and ns is not None and nb != ns:
        raise SelectorError(
            f"'{base_site.name}' selects {nb} positions in the base but its source site selects {ns}; the k-th "
            "base position receives the k-th source position, so the counts must match."
        )


def _mixer(base_site: Site, source_value: Callable[[], torch.Tensor], intervention,
           layout: Layout = Layout.TOKENS) -> Handler:
    def handler(full):
        base = select(full, base_site, layout)
        src = source_value().to(full.device)  # read on the source site's device (dispatched models)
        new = src if intervention is None else intervention(base, src)
        _check_value(base_site, full, new, layout)
        return write(full, base_site, new, layout)
    return handler


def interchange(model: nn.Module, base: Inputs, sources, sites, *, source_sites=None,
                intervention=None, in_batch: bool = False):
    """The model's output on `base` with `sites` set to their values on `sources`.

    `sources` is one input or a list (one per site group; then `sites` is a list of groups).
    `source_sites` (same structure as `sites`) says where each value is read in the source: the
    k-th selected base position receives the k-th selected source position. `intervention` (one,
    or one per group) maps (base value, source value) to the new value; the default replaces.
    `in_batch=True` runs base and sources as one batched forward (inputs of equal shapes).
    """
    graph = SiteGraph.from_model(model)
    groups = _groups(sources, sites, source_sites, intervention)
    base_batch, base_len = _shape(base)
    prepared = []
    for source, base_sites, src_sites, interv in groups:
        base_sites = _prepare(graph, base_sites, base)
        src_sites = _prepare(graph, src_sites, source)
        src_batch, src_len = _shape(source)
        if base_batch is not None and src_batch is not None and src_batch != base_batch:
            raise ShapeError(f"a source has batch size {src_batch}; the base has {base_batch} (they must match)")
        for b, s in zip(base_sites, src_sites):
            _check_pairing(b, s, base_len, src_len)
        if interv is not None and not callable(interv):
            raise InterventionError(f"intervention must be callable (e.g. an Intervention module), got {interv!r}")
        prepared.append((source, base_sites, src_sites, interv))
    if in_batch:
        return _interchange_in_batch(model, graph, base, prepared)

    # One stopped-early source run per distinct source input.
    runs: dict[int, tuple] = {}
    for source, _, src_sites, _ in prepared:
        runs.setdefault(id(source), (source, []))[1].extend(src_sites)
    values: dict[tuple[int, Site], torch.Tensor] = {}
    for key, (source, src_sites) in runs.items():
        got = get_value(model, source, list(dict.fromkeys(src_sites)))
        for site, value in got.items():
            values[(key, site)] = value
    handlers: dict[str, list[Handler]] = {}
    for source, base_sites, src_sites, interv in prepared:
        for b, s in zip(base_sites, src_sites):
            v = values[(id(source), s)]
            handlers.setdefault(b.name, []).append(_mixer(b, lambda v=v: v, interv, graph.point(b.name).layout))
    with hooked(graph, handlers):
        return call(model, base)


def _concat_inputs(inputs: list[Inputs]) -> Inputs:
    first = inputs[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(x.shape) for x in inputs}
        if len(shapes) != 1:
            raise ShapeError(f"in_batch mode needs base and sources of equal shapes, got {sorted(shapes)}")
        return torch.cat(inputs)
    keys = set(first.keys())
    if any(set(x.keys()) != keys for x in inputs):
        raise ShapeError("in_batch mode needs base and sources with the same input keys")
    out = {}
    for k in first:
        vals = [x[k] for x in inputs]
        if isinstance(vals[0], torch.Tensor) and vals[0].dim() > 0:
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) != 1:
                raise ShapeError(f"in_batch mode needs equal shapes; '{k}' has shapes {sorted(shapes)}")
            out[k] = torch.cat(vals)
        else:
            out[k] = vals[0]
    return out


def _slice_output(output, n: int):
    if isinstance(output, torch.Tensor):
        return output[:n]
    if isinstance(output, Mapping):
        for k in list(output.keys()):
            v = output[k]
            output[k] = v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 else None
        return output
    if isinstance(output, tuple):
        return tuple(_slice_output(o, n) for o in output)
    return output


def _interchange_in_batch(model, graph: SiteGraph, base, prepared):
    unique: list = []
    for source, *_ in prepared:
        if all(source is not u for u in unique):
            unique.append(source)
    batch = _shape(base)[0]
    if batch is None:
        raise ShapeError("in_batch mode needs batched tensor inputs")
    offset = {id(s): (i + 1) * batch for i, s in enumerate(unique)}
    captured: dict[tuple[int, Site], torch.Tensor] = {}
    readers: dict[str, list[Handler]] = {}
    writers: dict[str, list[Handler]] = {}
    for source, base_sites, src_sites, interv in prepared:
        off = offset[id(source)]
        for b, s in zip(base_sites, src_sites):
            ob, os_ = graph.order(b.name), graph.order(s.name)
            if ob is None or os_ is None or os_ > ob:
                raise InterventionError(
                    f"in_batch mode reads '{s.name}' in the source and writes '{b.name}' in the base in one "
                    "pass, so the source site must come no later than the base site (canonical sites only)."
                )
            key = (off, s)
            lb, ls = graph.point(b.name).layout, graph.point(s.name).layout

            def read(full, key=key, s=s, off=off, ls=ls):
                captured[key] = select(full[off:off + batch], s, ls)

            def mix(full, key=key, b=b, interv=interv, lb=lb):
                base_rows = full[:batch]
                src = captured[key].to(full.device)
                new = src if interv is None else interv(select(base_rows, b, lb), src)
                _check_value(b, base_rows, new, lb)
                return torch.cat([write(base_rows, b, new, lb), full[batch:]])

            readers.setdefault(s.name, []).append(read)
            writers.setdefault(b.name, []).append(mix)
    handlers = {name: readers.get(name, []) + writers.get(name, []) for name in {*readers, *writers}}
    with hooked(graph, handlers):
        output = call(model, _concat_inputs([base, *unique]))
    return _slice_output(output, batch)
