"""`patching_sweep`: activation patching of every (layer, position group[, head]) at any per-layer site, over a batch.

The clean base run is recorded once (`record_blocks`). For each patched layer L, the blocks before the
site (0..L for ``output``, 0..L-1 for a site inside block L) are replayed from that recording
(`replay_blocks`, repeated over the copies) and only the rest runs, on a batch of patched copies of the
clean batch: copy c of example e is row ``c * n + e``. Copies go through in chunks of about
`chunk_tokens` tokens, which keeps activations cache-sized on a CPU. The output head runs only on each
copy's readout position, on about `chunk_tokens` buffered readout states at a time (one head call on
many rows, not one per forward), and with a `metric` those logits are reduced to metric values as they
come, so memory does not grow with the number of copies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .cache import record_blocks, replay_blocks
from .errors import InterventionError, SelectorError, ShapeError, UnknownSiteError, UnsupportedModelError
from .graph import SiteGraph
from .hooks import Handler, _first, call, hooked, run_until
from .primitives import Inputs, _prepare, _shape, get_value
from .sites import Site

Metric = Callable[[torch.Tensor], torch.Tensor]


def _per_layer_names(graph: SiteGraph) -> list[str]:
    """The per-layer site names the graph has (``output``, ``attention_heads``, ...), in layer 0's order."""
    names: list[str] = []
    for name in graph.sites:
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m and m.group(2) not in names:
            names.append(m.group(2))
    return names


def _site_name(graph: SiteGraph, site) -> str:
    valid = _per_layer_names(graph)
    if not isinstance(site, str) or site not in valid:
        hint = ""
        m = re.fullmatch(r"layers\.(-?\d+)\.(.+)", site) if isinstance(site, str) else None
        if m:
            hint = f" (for '{site}' pass site={m.group(2)!r}, layers=[{m.group(1)}])"
        raise UnknownSiteError(
            f"patching_sweep's site must be a per-layer site name, got {site!r}{hint}; valid: {', '.join(valid)}."
        )
    return site


def _layer_list(graph: SiteGraph, layers, site: str) -> list[int]:
    """Validated layer indices (negatives count from the end), in the caller's order, each having `site`."""
    out = graph.layer_indices(layers)
    for layer in out:
        graph.point(f"layers.{layer}.{site}")  # UnknownSiteError (with valid names) where a layer lacks it
    return out


def _position_groups(positions, seq_len: int) -> list[tuple[int, ...]]:
    """Each entry of `positions` as a tuple of ints: an int is one position, a list a group patched together."""
    if positions is None:
        return [(p,) for p in range(seq_len)]
    if isinstance(positions, torch.Tensor):  # one list of positions: [k] or [1, k]
        if positions.dim() > 2 or (positions.dim() == 2 and positions.shape[0] != 1):
            raise SelectorError(
                f"positions must be a list of ints / lists of ints (or a [k] tensor), got shape {tuple(positions.shape)}"
            )
        positions = positions.flatten().tolist()
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    if not isinstance(positions, Sequence) or isinstance(positions, str) or not positions:
        raise SelectorError(f"positions must be a non-empty list of ints or lists of ints, got {positions!r}")
    groups = []
    for entry in positions:
        group = [entry] if isinstance(entry, int) and not isinstance(entry, bool) else entry
        if isinstance(group, torch.Tensor):
            group = group.flatten().tolist()
        if (not isinstance(group, Sequence) or isinstance(group, str) or not group
                or any(isinstance(p, bool) or not isinstance(p, int) for p in group)):
            raise SelectorError(
                f"each entry of positions must be an int or a non-empty list of ints (a group patched together), "
                f"got {entry!r}"
            )
        groups.append(tuple(group))
    return groups


def _mask(inputs: Inputs) -> torch.Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _readout_index(readout, n: int, seq_len: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-example readout positions, a LongTensor [n] of absolute positions on real tokens."""
    if isinstance(readout, torch.Tensor):
        if readout.dtype not in (torch.int64, torch.int32) or tuple(readout.shape) != (n,):
            raise SelectorError(
                f"readout must be an int or an integer tensor [{n}] (one position per example), got dtype "
                f"{readout.dtype} and shape {tuple(readout.shape)}"
            )
        index = readout.long().cpu()
    elif isinstance(readout, int) and not isinstance(readout, bool):
        index = torch.full((n,), readout, dtype=torch.long)
    else:
        raise SelectorError(f"readout must be an int or a LongTensor [{n}], got {readout!r}")
    bad = (index < -seq_len) | (index >= seq_len)
    if bool(bad.any()):
        raise SelectorError(
            f"readout {index[bad].tolist()} out of range: the base has {seq_len} positions "
            f"(valid -{seq_len}..{seq_len - 1})"
        )
    index = index % seq_len
    if mask is not None:
        real = mask.cpu().gather(1, index[:, None])[:, 0] != 0
        if not bool(real.all()):
            e = int((~real).nonzero()[0, 0])
            raise SelectorError(
                f"readout position {int(index[e])} of example {e} is padding (attention_mask is 0 there; that "
                f"row's real tokens are positions {(mask[e] != 0).nonzero()[:, 0].tolist()}); give each "
                "example's readout on a real token, e.g. readout=attention_mask.sum(1) - 1 for right padding."
            )
    return index


def _output_head(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The model's output embedding (LM head) and its `module:<path>:input` site, or None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return None
    path = next((name for name, module in model.named_modules() if module is head and name), None)
    return None if path is None else (head, f"module:{path}:input")


def _replay_upto(graph: SiteGraph, name: str, layer: int) -> int:
    """The last block that may be replayed when `name` (a site of block `layer`) is patched."""
    block = graph.point(f"layers.{layer}.output").module
    point = graph.point(name)
    if point.module is block and point.kind == "output":
        return layer  # the block's own output: its hooks fire on the replayed value
    if any(m is point.module for m in block.modules()):
        return layer - 1  # inside block `layer`: that block must run
    return -1  # somewhere else: recompute everything (always correct)


def _repeat_inputs(inputs: Inputs, n: int, copies: int) -> Inputs:
    """`copies` copies of a batch of n inputs, copy-major (row c * n + e is example e)."""
    def rep(t):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n:
            return t.repeat(copies, *[1] * (t.dim() - 1))
        return t
    if isinstance(inputs, torch.Tensor):
        return rep(inputs)
    return {k: rep(v) for k, v in inputs.items()}


def _check_metric_value(value, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise InterventionError(
            f"metric must return a 0-dim tensor (e.g. a mean logit difference over the batch), got {got} {where}"
        )
    return value


def patching_sweep(model: nn.Module, base: Inputs, source: Inputs, layers=None, positions=None,
                   readout: int | torch.Tensor = -1, chunk_tokens: int = 256, *, site: str = "output",
                   metric: Metric | None = None) -> torch.Tensor:
    """Activation patching: the base run with ``layers.{L}.{site}`` at a position group set to the source's value.

    ``site``: any per-layer site name of the model's graph (``output``, ``input``, ``attention_output``,
    ``mlp_output``, ``attention_heads`` — which also sweeps every head — and any other per-layer name).
    ``base`` / ``source``: a batch of pairs [n, seq] of the same shape (optionally a mapping with a
    right-padded ``attention_mask``); example e of the base is patched from example e of the source,
    position p from position p. ``positions``: entries are an int or a list of ints (a group patched
    together); default: each position alone. ``layers``: ints (negative from the end), any subset, in
    any order; default all. ``readout``: an int or a LongTensor [n] (each example's readout position).

    With ``metric(logits_at_readout [n, vocab]) -> 0-dim tensor``: returns [len(layers), len(positions)]
    ([len(layers), len(positions), heads] for ``attention_heads``) of metric values. Without a metric:
    the logits at the readout, [len(layers), len(positions), (heads,) vocab] for n = 1 and
    [len(layers), len(positions), (heads,) n, vocab] for n > 1.

    Cost: one headless source run, one clean base run, and per patched layer only the blocks from the
    site on, for the patched copies (``chunk_tokens`` tokens per forward at most), with the head on the
    readout positions only. The model's output must keep one row per example (an LM head; pooled
    classifiers raise UnsupportedModelError). Use eval mode and ``torch.no_grad()``.
    """
    graph = SiteGraph.from_model(model)
    if graph.num_layers == 0:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no blocks known to the site graph, so it has no layers.{{L}} sites to "
            "patch; use interchange with 'module:<path>' sites instead."
        )
    site = _site_name(graph, site)
    n, seq_len = _shape(base)
    src_n, src_len = _shape(source)
    if n is None or seq_len is None:
        raise ShapeError("patching_sweep needs a base of token ids [n, seq] (or a mapping with input_ids)")
    if (src_n, src_len) != (n, seq_len):
        raise ShapeError(
            f"the source must have the base's shape [{n}, {seq_len}] (example e, position p is patched from "
            f"example e, position p), got [{src_n}, {src_len}]."
        )
    if metric is not None and not callable(metric):
        raise InterventionError(f"metric must be callable: metric(logits [n, vocab]) -> 0-dim tensor, got {metric!r}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise SelectorError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    layer_ids = _layer_list(graph, layers, site)
    order = sorted(layer_ids)  # the forward meets the layers in this order
    names = [f"layers.{layer}.{site}" for layer in order]
    groups = _position_groups(positions, seq_len)
    for g, group in enumerate(groups):  # range and padding, against each input (SelectorError naming what is valid)
        probe = [Site(names[0], positions=group)]
        groups[g] = _prepare(graph, probe, base)[0].positions
        _prepare(graph, probe, source)
    ro = _readout_index(readout, n, seq_len, _mask(base))
    point = graph.point(names[0])
    heads = point.num_heads if point.kind == "heads" else None

    # which (position group, head) each copy patches: a boolean [copies, seq(, heads)]
    n_groups = len(groups)
    where = torch.zeros(n_groups, seq_len, dtype=torch.bool)
    for g, group in enumerate(groups):
        where[g, list(group)] = True
    if heads is not None:
        eye = torch.eye(heads, dtype=torch.bool)
        where = (where[:, None, :, None] & eye[None, :, None, :]).reshape(n_groups * heads, seq_len, heads)
    n_copies = where.shape[0]
    copies_per_chunk = max(1, chunk_tokens // (seq_len * n))

    values = get_value(model, source, names)  # ONE source run, stopped after the last site needed
    found = _output_head(model)
    head, head_site = found if found is not None else (None, None)
    states: list[torch.Tensor] = []

    def keep_readout(h):  # the head (and all after it) sees each row's readout position only
        if h.dim() != 3:
            return None
        rows = torch.arange(h.shape[0], device=h.device)
        states.append(h[rows, ro.to(h.device).repeat(h.shape[0] // n)][:, None])
        return states[-1]

    readout_only = {head_site: [keep_readout]} if head is not None else {}
    uptos = {layer: _replay_upto(graph, name, layer) for layer, name in zip(order, names)}
    recorded = list(range(max(uptos.values()) + 1))
    with record_blocks(model, recorded) as recording:  # the clean base run, once
        clean = _first(_run(model, graph, base, readout_only))
    clean_rows = _readout_logits(model, clean, head is not None, ro, n)
    # Apply the head to many copies' readout states at once, instead of once per forward (an LM head is a
    # vocabulary-sized matrix, read from memory at each call), when the model's logits are the head's output.
    head_at_end = (head is not None and len(states) == 1
                   and torch.allclose(head(states[0])[:, 0].to(clean_rows.device), clean_rows, rtol=1e-4, atol=1e-5))
    if metric is not None:
        _check_metric_value(metric(clean_rows), "on the clean run's logits")
    states.clear()

    reduced: list[torch.Tensor] = []  # per copy: a metric value, or its logits [n, vocab]

    def reduce(logits: torch.Tensor) -> None:  # [copies * n, vocab], copy-major
        for rows in logits.split(n):
            reduced.append(rows if metric is None else _check_metric_value(metric(rows), "on a patched copy"))

    def flush() -> None:
        if states:
            reduce(head(torch.cat(states))[:, 0].to(clean_rows.device))  # where the model returns its logits
            states.clear()

    for layer, name in zip(order, names):
        value = values[name]
        for start in range(0, n_copies, copies_per_chunk):
            chunk = where[start:start + copies_per_chunk]
            copies = chunk.shape[0]
            handlers = {name: [_patched_copies(value, chunk, point.layout.positions)], **readout_only}
            with replay_blocks(model, recording, upto=uptos[layer], repeat=copies):
                output = _run(model, graph, _repeat_inputs(base, n, copies), handlers,
                              stop_at=head_site if head_at_end else None)
            if head_at_end:
                if sum(s.shape[0] for s in states) >= chunk_tokens:  # a chunk's worth of readout rows
                    flush()
                continue
            states.clear()  # the model applied its head (and what follows it) itself
            reduce(_readout_logits(model, _first(output), head is not None, ro.repeat(copies), copies * n))
    flush()
    out = torch.stack(reduced)  # [layers * copies, (n, vocab)]
    if metric is None and n == 1:
        out = out[:, 0]
    elif metric is not None and not out.is_floating_point():
        out = out.float()
    out = out.reshape(len(order), n_groups, *([heads] if heads is not None else []), *out.shape[1:])
    if order != layer_ids:
        out = out[torch.tensor([order.index(layer) for layer in layer_ids])]
    return out


def _readout_logits(model, logits: torch.Tensor, readout_only: bool, ro: torch.Tensor, rows: int) -> torch.Tensor:
    """Logits at each row's readout position, [rows, vocab]; a clear error for outputs without a positions axis."""
    expected_len = 1 if readout_only else None
    if logits.dim() < 3 or logits.shape[0] != rows or (expected_len is not None and logits.shape[1] != expected_len):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s output has shape {tuple(logits.shape)}; patching_sweep needs one row per "
            f"example and a positions axis (expected [{rows}, {expected_len or 'seq'}, ...]), as from an LM head. "
            "Sequence-level heads (pooled classifiers) are not supported; use interchange in a loop."
        )
    if readout_only:
        return logits[:, 0]
    return logits[torch.arange(rows, device=logits.device), ro.to(logits.device)]


def _run(model, graph: SiteGraph, inputs, handlers, stop_at: str | None = None):
    """One forward with `handlers`; with `stop_at`, it ends once that site is reached (returns None)."""
    if stop_at is not None:
        return run_until(model, inputs, graph, handlers, stop_after=[stop_at])
    with hooked(graph, handlers):
        return call(model, inputs)


def _patched_copies(source: torch.Tensor, where: torch.Tensor, axis: int = 1) -> Handler:
    """A handler turning the copies' clean rows into patched ones: copy c takes `source` where ``where[c]``.

    `source` is the site's whole value on the source batch [n, seq, ...]; `where` is [copies, seq(, heads)],
    its seq axis meeting the value's positions axis `axis` (1; 2 for the attention pattern's query axis).
    """
    copies = where.shape[0]

    def handler(full: torch.Tensor) -> torch.Tensor:
        n = source.shape[0]
        if full.shape[0] != copies * n or full.shape[1:] != source.shape[1:]:
            raise InterventionError(
                f"patching_sweep expected the site's value as [{copies * n}, {', '.join(map(str, source.shape[1:]))}]"
                f" ({copies} copies of {n} examples), got shape {tuple(full.shape)}"
            )
        mask = where.to(full.device)
        mask = mask.view(copies, 1, *[1] * (axis - 1), *mask.shape[1:], *[1] * (full.dim() - axis - mask.dim() + 1))
        grid = full.reshape(copies, n, *full.shape[1:])
        return torch.where(mask, source.to(full.dtype)[None], grid).reshape(full.shape)

    return handler
