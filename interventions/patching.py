"""`patching_sweep`: activation patching of every (layer, position) pair with one source run and shared base work.

The clean base run is recorded once (`record_blocks`); for each patched layer L, blocks 0..L are
replayed from that recording (`replay_blocks`) and only blocks L+1.. run, on a batch of patched copies
of the clean row. Copies go through in chunks of about `chunk_tokens` tokens, which keeps activations
cache-sized on a CPU. The output head runs once, at the end, on the readout position of every copy
(checked on the clean run to equal the model's own logits; otherwise each forward applies it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import InterventionError, SelectorError, ShapeError, UnsupportedModelError
from .cache import record_blocks, replay_blocks
from .graph import SiteGraph
from .hooks import Handler, _first, call, hooked, run_until
from .primitives import Inputs, _prepare, _shape, get_value
from .sites import Site


def _layer_list(graph: SiteGraph, layers) -> list[int]:
    """Validated layer indices (negatives count from the end), in the caller's order."""
    n = graph.num_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    if not isinstance(layers, Sequence) or isinstance(layers, str) or not layers:
        raise SelectorError(f"layers must be None (all) or a non-empty list of layer indices, got {layers!r}")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise SelectorError(f"layers must be ints (0..{n - 1}), got {layer!r}")
        absolute = layer + n if -n <= layer < 0 else layer
        graph.point(f"layers.{absolute}.output")  # UnknownSiteError (with valid names) when out of range
        out.append(absolute)
    if len(set(out)) != len(out):
        raise SelectorError(f"layers must not repeat, got {list(layers)}")
    return out


def _check_readout(readout, seq_len: int) -> int:
    if isinstance(readout, bool) or not isinstance(readout, int) or not -seq_len <= readout < seq_len:
        raise SelectorError(
            f"readout must be a position of the base (an int in -{seq_len}..{seq_len - 1}), got {readout!r}"
        )
    return readout % seq_len


def _output_head(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The model's output embedding (LM head) and its `module:<path>:input` site, or None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return None
    path = next((name for name, module in model.named_modules() if module is head and name), None)
    return None if path is None else (head, f"module:{path}:input")


def patching_sweep(model: nn.Module, base: Inputs, source: Inputs, layers=None, positions=None,
                   readout: int = -1, chunk_tokens: int = 256) -> torch.Tensor:
    """Logits at `readout` of the base with ``layers.{L}.output`` at position p set to the source's value.

    Returns [len(layers), len(positions), vocab]: entry [i, j] is the base run with
    ``layers.{layers[i]}.output`` at ``positions[j]`` replaced by its value on `source`, read at the
    `readout` position. Base and source are one example each ([1, seq], the same shape; a ShapeError
    otherwise); ``layers`` / ``positions`` are ints (negative from the end) and default to all. Cost:
    one headless source run, one clean base run, and per patched layer only the blocks above it on the
    patched copies (``chunk_tokens`` tokens per forward at most), and the head once, on the readout
    position of every copy. The model's output must keep one row per example
    (an LM head; pooled classifiers raise UnsupportedModelError). Use eval mode and ``torch.no_grad()``.
    """
    graph = SiteGraph.from_model(model)
    if graph.num_layers == 0:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no blocks known to the site graph, so it has no layers.{{L}}.output "
            "sites to patch; use interchange with 'module:<path>' sites instead."
        )
    batch, seq_len = _shape(base)
    src_batch, src_len = _shape(source)
    if batch != 1 or seq_len is None:
        raise ShapeError(
            f"patching_sweep needs a base of batch size 1 with a sequence axis ([1, seq]), got batch {batch}; "
            "sweep each example separately."
        )
    if src_batch != 1 or src_len != seq_len:
        raise ShapeError(
            f"the source must have the base's shape [1, {seq_len}] (position p is patched from position p), "
            f"got batch {src_batch} and {src_len} positions."
        )
    layer_ids = _layer_list(graph, layers)
    pos = tuple(range(seq_len)) if positions is None else positions
    if isinstance(pos, torch.Tensor):  # one list of positions: [k] or [1, k]
        if pos.dim() > 2 or (pos.dim() == 2 and pos.shape[0] != 1):
            raise SelectorError(f"positions must be a list of ints (or a [k] tensor), got shape {tuple(pos.shape)}")
        pos = [int(p) for p in pos.flatten().tolist()]
    readout = _check_readout(readout, seq_len)
    order = sorted(layer_ids)  # the forward meets the layers in this order
    sites = [Site(f"layers.{layer}.output", positions=pos) for layer in order]
    base_sites = _prepare(graph, sites, base)  # checks the positions (range, padding) against each input
    src_sites = _prepare(graph, sites, source)
    pos_index = torch.tensor(base_sites[0].positions)
    n_pos = len(pos_index)

    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise SelectorError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    rows_per_chunk = max(1, chunk_tokens // seq_len)

    values = get_value(model, source, src_sites)  # ONE source run, stopped after the last layer needed
    found = _output_head(model)
    head, head_site = found if found is not None else (None, None)
    expected_len = 1 if head is not None else seq_len
    readout_states: list[torch.Tensor] = []

    def keep_readout(h):  # the head (and all after it) sees the readout position only
        readout_states.append(h[:, readout:readout + 1])
        return readout_states[-1]

    readout_only = {head_site: [keep_readout]} if head is not None else {}
    with record_blocks(model, order) as recording:  # the clean base run, once
        clean = _first(_run(model, graph, base, readout_only, n_pos))
    # Apply the head once to every copy's readout state, instead of once per forward (an LM head is a
    # vocabulary-sized matrix, read from memory at each call), when the model's logits are the head's output.
    # (the head runs on its execution device; the model returns logits where its inputs are: see docs/dispatch.md)
    head_at_end = head is not None and torch.allclose(head(readout_states[0]).to(clean.device), clean,
                                                      rtol=1e-4, atol=1e-5)
    readout_states.clear()
    pieces = []
    for layer, site in zip(order, src_sites):
        for start in range(0, n_pos, rows_per_chunk):
            chunk = slice(start, start + rows_per_chunk)
            handlers = {site.name: [_patched_copies(values[site][0, chunk], pos_index[chunk])], **readout_only}
            with replay_blocks(model, recording, upto=layer):  # blocks 0..layer cost nothing
                output = _run(model, graph, base, handlers, n_pos, stop_at=head_site if head_at_end else None)
            if head_at_end:
                continue
            logits = _first(output)
            rows = len(pos_index[chunk])
            if logits.dim() < 3 or logits.shape[0] != rows or logits.shape[1] != expected_len:
                raise UnsupportedModelError(
                    f"{type(model).__name__}'s output has shape {tuple(logits.shape)}; patching_sweep needs one "
                    f"row per example and a positions axis (expected [{rows}, {expected_len}, ...]), as from an "
                    "LM head. Sequence-level heads (pooled classifiers) are not supported; use interchange in a "
                    "loop."
                )
            pieces.append(logits[:, 0 if head is not None else readout])
    if head_at_end:
        pieces = [head(torch.cat(readout_states))[:, 0].to(clean.device)]
    read = torch.cat(pieces).reshape(len(order), n_pos, *pieces[0].shape[1:])
    if order != layer_ids:
        read = read[torch.tensor([order.index(layer) for layer in layer_ids])]
    return read


def _run(model, graph: SiteGraph, base, handlers, n_pos: int, stop_at: str | None = None):
    """One forward with `handlers`; with `stop_at`, it ends once that site is reached (returns None)."""
    try:
        if stop_at is not None:
            return run_until(model, base, graph, handlers, stop_after=[stop_at])
        with hooked(graph, handlers):
            return call(model, base)
    except RuntimeError as e:
        raise UnsupportedModelError(
            f"{type(model).__name__} could not run a batch of {n_pos} patched copies with batch-1 masks; "
            "patching_sweep needs layers that broadcast a batch-1 attention mask / rotary table. Use "
            f"interchange in a loop instead. ({e})"
        ) from e


def _patched_copies(source_rows: torch.Tensor, pos_index: torch.Tensor) -> Handler:
    """A handler replacing the clean row by len(pos_index) copies of it, copy j patched at pos_index[j]."""
    n = len(pos_index)
    copy_index = torch.arange(n)

    def handler(full: torch.Tensor) -> torch.Tensor:
        if full.dim() != 3:
            raise InterventionError(f"layer outputs must be [batch, seq, hidden], got shape {tuple(full.shape)}")
        copies = full[:1].expand(n, -1, -1)
        index = (copy_index.to(full.device), pos_index.to(full.device))
        return copies.index_put(index, source_rows.to(full.dtype))

    return handler
