"""IIA and the IIT loss: how well a network's interchange outputs match a causal model's counterfactuals.

Both run the network on a `CounterfactualDataset` batch with each source's variables interchanged at
their aligned sites (`Alignment`). Sites are read in the neuron basis, or, for DAS, with their
`dims` read in a rotated basis: pass ``rotation=R`` (a `Rotation`, or ``{site name: Rotation}``), or
pass one intervention per key (``interventions={"WX": RotatedSubspace(...)}``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import Alignment
from .causal_model import CausalModel, CounterfactualDataset
from .errors import AlignmentError, CausalModelError, InterventionError
from .hooks import _first
from .operators import Rotation
from .primitives import interchange
from .registry import Saveable
from .sites import Site, as_site


@dataclass(frozen=True)
class IIAResult:
    """Interchange intervention accuracy: overall, and over the rows intervening on each variable."""

    accuracy: float
    per_variable: Mapping[str, float]
    num_examples: int


class RotatedDims(Saveable, nn.Module):
    """Interchange coordinates `dims` of R·h (R a shared `Rotation`); the rest of h keeps the base.

    What only it does, next to `RotatedSubspace`: `dims` is any set of rotated coordinates (not only a
    contiguous slice), validated as an alignment's image (AlignmentError), and it never owns its
    rotation: `iia`/`iit_loss`/`das_loss` build one per aligned variable from ``rotation=`` and the
    alignment's dims. Use `RotatedSubspace` to write a DAS intervention by hand.
    """

    def __init__(self, rotation: Rotation, dims):
        super().__init__()
        self.rotation = rotation
        if isinstance(dims, slice):
            start, stop, _ = dims.indices(rotation.rank)
            index = list(range(start, stop))
        else:
            index = list(dims)
        bad = [d for d in index if not 0 <= d < rotation.rank]
        if not index or bad:
            raise AlignmentError(
                f"rotated dims {dims} do not fit a rotation of rank {rotation.rank} (valid 0..{rotation.rank - 1})"
            )
        self.register_buffer("index", torch.tensor(index), persistent=False)

    def forward(self, base, source=None):
        if source is None:
            raise InterventionError("RotatedDims needs a source value: use it with interchange()")
        if base.shape[-1] != self.rotation.size:
            raise InterventionError(
                f"a rotation of size {self.rotation.size} cannot rotate a value whose last axis has size "
                f"{base.shape[-1]}"
            )
        basis = self.rotation.weight[self.index].to(base.device, base.dtype)  # [k, size], on the site's device
        return base + ((source - base) @ basis.T) @ basis


def _sorted_sites(sites) -> list[Site]:
    return sorted((as_site(s) for s in sites), key=repr)


def _rotation_for(rotation, name: str):
    if rotation is None or isinstance(rotation, Rotation):
        return rotation
    return rotation.get(name)


def _plan(batch: CounterfactualDataset, alignment: Alignment, rotation, interventions):
    """One (source input, site, intervention) entry per aligned site of each intervened variable."""
    interventions = dict(interventions or {})
    if rotation is not None and not isinstance(rotation, (Rotation, Mapping)):
        raise InterventionError(f"rotation must be a Rotation or {{site name: Rotation}}, got {type(rotation).__name__}")
    missing = [v for v in batch.intervened if v not in alignment]
    if missing:
        raise AlignmentError(
            f"the dataset intervenes on {missing}, which the alignment does not map "
            f"(its keys are {sorted(map(str, alignment.domain))})"
        )
    unused = [k for k in interventions if k not in alignment]
    if unused:
        raise AlignmentError(f"interventions given for {unused}, which are not alignment keys")
    sources, sites, calls = [], [], []
    for group, source in zip(batch.variables, batch.source_inputs):
        for var in group:
            for site in _sorted_sites(alignment[var]):
                call = interventions.get(var)
                rot = _rotation_for(rotation, site.name)
                if call is None and rot is not None and site.dims is not None:
                    site, call = Site(site.name, site.positions, site.heads), RotatedDims(rot, site.dims)
                sources.append(source)
                sites.append([site])
                calls.append(call)
    return sources, sites, calls


def interchange_output(model: nn.Module, batch: CounterfactualDataset, alignment: Alignment, *,
                       rotation=None, interventions: Mapping | None = None):
    """The network's output on `batch`'s bases with each group's variables interchanged from its source."""
    if not isinstance(batch, CounterfactualDataset):
        raise InterventionError(f"expected a CounterfactualDataset batch, got {type(batch).__name__}")
    sources, sites, calls = _plan(batch, alignment, rotation, interventions)
    return interchange(model, batch.base_inputs, sources, sites, intervention=calls)


def logits_of(output) -> torch.Tensor:
    """The logits tensor of a model output (a tensor, a ModelOutput's `logits`, or a tuple's first)."""
    logits = _first(output)
    if logits is None:  # an output object that is neither a mapping nor a tuple
        logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise InterventionError(f"cannot find logits in a model output of type {type(output).__name__}")
    return logits


def _datasets(dataset) -> list[CounterfactualDataset]:
    parts = [dataset] if isinstance(dataset, CounterfactualDataset) else list(dataset)
    if not parts or not all(isinstance(p, CounterfactualDataset) for p in parts):
        raise InterventionError("dataset must be a CounterfactualDataset or a non-empty list of them")
    return parts


def iia(model: nn.Module, causal_model: CausalModel, alignment: Alignment, dataset, *, batch_size: int = 256,
        readout: Callable | None = None, rotation=None, interventions: Mapping | None = None) -> IIAResult:
    """Fraction of rows where the network's interchange prediction equals the counterfactual label.

    `dataset`: one `CounterfactualDataset` or a list (e.g. one per intervened variable set).
    `readout(output) -> predictions [batch]` (default: argmax of the logits). Measured in eval mode
    without gradients (the model's mode is restored afterwards).
    """
    parts = _datasets(dataset)
    for part in parts:
        unknown = [v for v in part.intervened if v not in causal_model.variables]
        if unknown:
            raise CausalModelError(f"the dataset intervenes on {unknown}, which the causal model does not have")
        _plan(part, alignment, rotation, interventions)  # validate before running anything
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InterventionError(f"batch_size must be a positive int, got {batch_size!r}")
    readout = readout or (lambda out: logits_of(out).argmax(-1))
    correct, total = 0, 0
    var_correct: dict[str, int] = {}
    var_total: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for part in parts:
                for batch in part.batches(batch_size):
                    out = interchange_output(model, batch, alignment, rotation=rotation, interventions=interventions)
                    pred = torch.as_tensor(readout(out)).reshape(-1).to(batch.labels.device)
                    ok = int((pred == batch.labels.reshape(-1)).sum())
                    correct, total = correct + ok, total + len(batch)
                    for v in part.intervened:
                        var_correct[v] = var_correct.get(v, 0) + ok
                        var_total[v] = var_total.get(v, 0) + len(batch)
    finally:
        model.train(was_training)
    per_var = {v: var_correct[v] / var_total[v] for v in var_total}
    return IIAResult(accuracy=correct / total, per_variable=MappingProxyType(per_var), num_examples=total)


def iit_loss(model: nn.Module, batch: CounterfactualDataset, alignment: Alignment, *, rotation=None,
             interventions: Mapping | None = None, logits: Callable = logits_of) -> torch.Tensor:
    """Cross-entropy between the network's interchange logits and the counterfactual labels (has grads)."""
    out = interchange_output(model, batch, alignment, rotation=rotation, interventions=interventions)
    scores = logits(out)
    return F.cross_entropy(scores, batch.labels.to(scores.device, torch.long))
