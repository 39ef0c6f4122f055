"""Reuse a forward pass: record each block's raw output, later replay blocks instead of recomputing them.

`record_blocks(model)` keeps what blocks returned during the forwards run inside it.
`replay_blocks(model, recording, upto=L)` makes blocks 0..L return those recorded outputs without
computing anything, so a second forward on the same inputs (an interchange at ``layers.L.output`` or
later, through `set_value`/`interchange`, whose hooks still fire on the replayed outputs) only
recomputes the embeddings and blocks L+1.. . Gradients flow into the recording's graph.
Sites inside blocks 0..L (their input, attention, MLP) are not reached while they are replayed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .errors import InterventionError, ShapeError, UnsupportedModelError
from .graph import SiteGraph
from .hooks import _first, _main_input

_MISSING = object()


def _blocks(model: nn.Module) -> list[nn.Module]:
    graph = SiteGraph.from_model(model)
    if not graph.num_layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no recognised blocks (layers.{{i}}), so its block outputs cannot be "
            "recorded or replayed."
        )
    return [graph.point(f"layers.{i}.output").module for i in range(graph.num_layers)]


class BlockRecording:
    """Raw block outputs of the last forward run under `record_blocks` (layer -> output object)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.outputs: dict[int, object] = {}

    def __contains__(self, layer: int) -> bool:
        return layer in self.outputs

    def value(self, layer: int) -> torch.Tensor:
        """The recorded value of ``layers.{layer}.output`` ([batch, seq, hidden])."""
        if layer not in self.outputs:
            raise InterventionError(
                f"layer {layer} was not recorded (recorded: {sorted(self.outputs)}); run a forward inside "
                "record_blocks(model, layers=...) that includes it."
            )
        return _first(self.outputs[layer])


@contextmanager
def _patched(blocks: list[nn.Module], layers: Iterable[int], make):
    saved = []
    try:
        for i in layers:
            block = blocks[i]
            saved.append((block, block.__dict__.get("forward", _MISSING)))
            block.forward = make(i, block.forward)
        yield
    finally:
        for block, old in reversed(saved):
            if old is _MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old


@contextmanager
def record_blocks(model: nn.Module, layers: Iterable[int] | None = None):
    """Record the raw outputs of `layers` (default: all blocks) during forwards in the block.

    Yields a `BlockRecording`; each forward overwrites the previous one's entries.
    """
    blocks = _blocks(model)
    chosen = SiteGraph.from_model(model).layer_indices(list(layers) if layers is not None else None, allow_empty=True)
    recording = BlockRecording(len(blocks))

    def make(i, forward):
        def recorded(*args, **kwargs):
            out = forward(*args, **kwargs)
            recording.outputs[i] = out
            return out
        return recorded

    with _patched(blocks, chosen, make):
        yield recording


def _repeated(output, repeat: int):
    """`output` with its main tensor repeated `repeat` times along the batch (copy-major rows), not mutated."""
    if repeat == 1:
        return output
    t = _first(output)
    new = t.expand(repeat, *t.shape[1:]) if t.shape[0] == 1 else t.repeat(repeat, *[1] * (t.dim() - 1))
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, Mapping):
        copy = type(output)(output)
        copy[next(k for k, v in output.items() if v is t)] = new
        return copy
    return (new, *output[1:]) if isinstance(output, tuple) else [new, *output[1:]]


@contextmanager
def replay_blocks(model: nn.Module, recording: BlockRecording, upto: int, repeat: int = 1):
    """Blocks 0..`upto` return their recorded outputs instead of running (forward hooks still fire).

    ``upto=-1`` replays nothing. The inputs of the replayed forward must have the recorded batch and
    sequence shape; with ``repeat=r``, the recorded batch repeated r times (row ``c * batch + e`` is
    example e), and the replayed outputs are repeated likewise — a batch of r copies of the recorded run.
    """
    blocks = _blocks(model)
    if not isinstance(recording, BlockRecording):
        raise InterventionError(f"recording must be a BlockRecording from record_blocks, got {type(recording).__name__}")
    if recording.num_layers != len(blocks):
        raise InterventionError(
            f"the recording has {recording.num_layers} blocks, this model {len(blocks)}: replay a recording "
            "of the same model"
        )
    if not -1 <= upto < len(blocks):
        raise InterventionError(f"upto={upto} out of range: the model has {len(blocks)} blocks (valid -1..{len(blocks) - 1})")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise InterventionError(f"repeat must be a positive int, got {repeat!r}")
    layers = list(range(upto + 1))
    missing = [i for i in layers if i not in recording]
    if missing:
        raise InterventionError(f"cannot replay layers {missing}: they were not recorded (recorded: "
                                f"{sorted(recording.outputs)})")

    def make(i, forward):
        batch, seq = recording.value(i).shape[:2]
        expected = (batch * repeat, seq)
        output = _repeated(recording.outputs[i], repeat)

        def replayed(*args, **kwargs):
            x = _main_input(args, kwargs)
            if x is not None and tuple(x.shape[:2]) != expected:
                raise ShapeError(
                    f"replaying block {i}: its input has batch/sequence shape {tuple(x.shape[:2])}, the recording "
                    f"{expected} (recorded batch {batch} x repeat {repeat}); replay only on the inputs that were "
                    "recorded."
                )
            return output
        return replayed

    with _patched(blocks, layers, make):
        yield
