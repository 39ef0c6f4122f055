"""`patching_sweep`: activation patching of every (layer, position) pair in one source run and one base run.

Why one base run suffices: the patched copies of the clean row are appended to the batch at the layer
where they are patched (batch 1 -> 1+P -> 1+2P ...), so the base below every patched layer is computed
once and shared; the batch-1 attention mask / rotary tables broadcast over the grown batch. The output
head runs on the readout position only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import InterventionError, SelectorError, ShapeError, UnsupportedModelError
from .graph import SiteGraph
from .hooks import Handler, call, hooked
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


def _head_input_site(model: nn.Module) -> str | None:
    """`module:<path>:input` of the model's output embedding (the LM head), or None if it has none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return None
    path = next((name for name, module in model.named_modules() if module is head and name), None)
    return None if path is None else f"module:{path}:input"


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output["logits"] if "logits" in output else next(iter(output.values()))
    return output[0]


def patching_sweep(model: nn.Module, base: Inputs, source: Inputs, layers=None, positions=None,
                   readout: int = -1) -> torch.Tensor:
    """Logits at `readout` of the base with ``layers.{L}.output`` at position p set to the source's value.

    Returns [len(layers), len(positions), vocab]: entry [i, j] is the base run with
    ``layers.{layers[i]}.output`` at ``positions[j]`` replaced by its value on `source`, read at the
    `readout` position. Base and source are one example each ([1, seq], the same shape; a ShapeError
    otherwise); ``layers`` / ``positions`` are ints (negative from the end) and default to all. Cost:
    one headless source run plus one base run whose batch grows by len(positions) rows per patched
    layer, the head on the readout position only. The model's output must keep one row per example
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

    values = get_value(model, source, src_sites)  # ONE source run, stopped after the last layer needed
    handlers: dict[str, list[Handler]] = {}
    for site in src_sites:
        handlers[site.name] = [_appender(values[site][0], pos_index)]
    head = _head_input_site(model)
    if head is not None:  # the head (and anything after it) runs on the readout position only
        handlers[head] = [lambda h: h[:, readout:readout + 1]]
    with hooked(graph, handlers):
        try:
            output = call(model, base)
        except RuntimeError as e:
            raise UnsupportedModelError(
                f"{type(model).__name__} could not run the grown batch (1 + {n_pos} rows per patched layer) "
                "with batch-1 masks; patching_sweep needs layers that broadcast a batch-1 attention mask / "
                f"rotary table. Use interchange in a loop instead. ({e})"
            ) from e
    logits = _first_tensor(output)
    rows = 1 + len(order) * n_pos
    expected_len = 1 if head is not None else seq_len
    if logits.dim() < 3 or logits.shape[0] != rows or logits.shape[1] != expected_len:
        raise UnsupportedModelError(
            f"{type(model).__name__}'s output has shape {tuple(logits.shape)}; patching_sweep needs one row "
            f"per example and a positions axis (expected [{rows}, {expected_len}, ...]), as from an LM head. "
            "Sequence-level heads (pooled classifiers) are not supported; use interchange in a loop."
        )
    read = logits[1:, 0 if head is not None else readout]
    read = read.reshape(len(order), n_pos, *read.shape[1:])
    if order != layer_ids:
        read = read[torch.tensor([order.index(layer) for layer in layer_ids])]
    return read


def _appender(source_rows: torch.Tensor, pos_index: torch.Tensor) -> Handler:
    """A handler that appends P copies of the clean row (row 0), copy j patched at position j's index."""
    n_pos = len(pos_index)
    copy_index = torch.arange(n_pos)

    def handler(full: torch.Tensor) -> torch.Tensor:
        if full.dim() != 3:
            raise InterventionError(f"layer outputs must be [batch, seq, hidden], got shape {tuple(full.shape)}")
        copies = full[:1].expand(n_pos, -1, -1)
        index = (copy_index.to(full.device), pos_index.to(full.device))
        patched = copies.index_put(index, source_rows.to(full.dtype))
        return torch.cat([full, patched])

    return handler
