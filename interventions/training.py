"""Helpers for IIT and DAS in a plain PyTorch loop: losses, freezing, and batches mixed across datasets.

IIT trains the network (``loss = task + iit_loss``); DAS trains only the rotation (or the given
interventions) with the network frozen: ``das_loss`` builds its graph with the network's
parameters excluded, so ``loss.backward()`` reaches the rotation alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import Alignment
from .causal_model import CounterfactualDataset
from .errors import InterventionError
from .hooks import call
from .metrics import iit_loss, logits_of


@contextmanager
def frozen(*modules: nn.Module):
    """Set ``requires_grad=False`` on the modules' parameters for the block; restore them afterwards.

    Restored by name, not by object: accelerate's offloading replaces a module's parameter objects at
    every call (loaded for the forward, back on ``meta`` after), keeping their ``requires_grad``.
    """
    saved = [(m, name, p.requires_grad) for m in modules for name, p in m.named_parameters()]
    try:
        for m, name, _ in saved:
            m.get_parameter(name).requires_grad_(False)
        yield
    finally:
        for m, name, r in saved:
            m.get_parameter(name).requires_grad_(r)


def das_loss(model: nn.Module, batch: CounterfactualDataset, alignment: Alignment, *, rotation=None,
             interventions: Mapping | None = None, logits=logits_of) -> torch.Tensor:
    """The IIT cross-entropy with the network frozen: gradients reach only the rotation/interventions."""
    trainable = []
    if rotation is not None:
        rotations = rotation.values() if isinstance(rotation, Mapping) else [rotation]
        trainable += [p for r in rotations for p in r.parameters() if p.requires_grad]
    for module in (interventions or {}).values():
        if isinstance(module, nn.Module):
            trainable += [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise InterventionError(
            "das_loss needs something to train: a Rotation (rotation=...) or trainable interventions "
            "(interventions={key: RotatedSubspace(...)})"
        )
    with frozen(model):
        return iit_loss(model, batch, alignment, rotation=rotation, interventions=interventions, logits=logits)


def task_loss(model: nn.Module, batch: CounterfactualDataset, logits=logits_of) -> torch.Tensor:
    """Cross-entropy of the network on the bases against the causal model's (un-intervened) labels."""
    scores = logits(call(model, batch.base_inputs))
    return F.cross_entropy(scores, batch.base_labels.to(scores.device, torch.long))


def mixed_batches(datasets: Sequence[CounterfactualDataset], batch_size: int,
                  generator: torch.Generator | None = None) -> Iterator[CounterfactualDataset]:
    """One epoch over several datasets: each one's shuffled batches, interleaved in random order.

    Datasets may intervene on different variables, so a batch never mixes two of them.
    """
    if isinstance(datasets, CounterfactualDataset):
        datasets = [datasets]
    if not datasets:
        raise InterventionError("mixed_batches needs at least one dataset")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    streams = [list(d.batches(batch_size, g)) for d in datasets]
    tags = torch.cat([torch.full((len(s),), i) for i, s in enumerate(streams)])
    tags = tags[torch.randperm(len(tags), generator=g)]
    cursors = [0] * len(streams)
    for t in tags.tolist():
        yield streams[t][cursors[t]]
        cursors[t] += 1
