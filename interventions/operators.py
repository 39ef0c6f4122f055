"""Intervention types: `nn.Module`s mapping (base value, source value) to the new value.

Each receives the *selected* slices ([batch, positions, ..., dims]); source-free ones (`Zero`,
`Constant`, `Add`) also work as `set_value` callables. Parameters save and load with `state_dict`;
`save_interventions` / `load_interventions` save whole interventions (every subclass registers itself).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations

from .errors import InterventionError
from .registry import Saveable


class Intervention(Saveable, nn.Module):
    """Base class: ``forward(base, source=None) -> new value`` (same shape as `base`)."""

    needs_source = True

    def forward(self, base: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def _need(source, name):
    if source is None:
        raise InterventionError(f"{name} needs a source value: use it with interchange(), not set_value()")
    return source


class Replace(Intervention):
    """Replace the base value with the source value (the default interchange)."""

    def forward(self, base, source=None):
        return _need(source, "Replace")


class Zero(Intervention):
    """Zero ablation."""

    needs_source = False

    def forward(self, base, source=None):
        return torch.zeros_like(base)


class Constant(Intervention):
    """Set to a fixed value (broadcast over the selection); `Constant.mean_of` gives mean ablation."""

    needs_source = False

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", torch.as_tensor(value).detach().clone())

    @classmethod
    def mean_of(cls, activations: torch.Tensor, dims: tuple[int, ...] = (0,)) -> "Constant":
        """Mean ablation: the mean of `activations` over `dims` (default: the batch axis)."""
        return cls(activations.detach().mean(dim=dims, keepdim=True))

    def forward(self, base, source=None):
        return self.value.to(base.device, base.dtype).expand_as(base)


class Add(Intervention):
    """Add a (trainable) steering vector: base + scale * vector."""

    needs_source = False

    def __init__(self, vector: torch.Tensor, scale: float = 1.0, trainable: bool = False):
        super().__init__()
        vector = torch.as_tensor(vector).detach().clone()
        if trainable:
            self.vector = nn.Parameter(vector)
        else:
            self.register_buffer("vector", vector)
        self.scale = scale

    def forward(self, base, source=None):
        return base + self.scale * self.vector.to(base.device, base.dtype)


class Rotation(Saveable, nn.Module):
    """A learnable orthogonal matrix R [size, size] (orthogonal parametrisation); shareable.

    With ``rank < size`` only the first `rank` rows exist: R [rank, size] with orthonormal rows,
    parametrised by a [rank, size] tensor alone (no [size, size] trivialisation base is kept), so
    memory and saved files hold rank x size numbers.
    """

    def __init__(self, size: int, rank: int | None = None):
        super().__init__()
        rank = size if rank is None else rank
        if not 0 < rank <= size:
            raise InterventionError(f"rank must be in 1..{size}, got {rank}")
        self.size, self.rank = size, rank
        # Full rank: the default dynamic trivialisation (a [size, size] base + the update). Low rank: the
        # weight is exp(A) restricted to `rank` rows, A built from the [rank, size] parameter only.
        self.linear = parametrizations.orthogonal(nn.Linear(size, rank, bias=False),
                                                  use_trivialization=rank == size)

    @property
    def weight(self) -> torch.Tensor:
        """[rank, size] with orthonormal rows: row i is the i-th rotated basis vector."""
        return self.linear.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also read a low-rank state saved with the former [size, size] trivialisation base."""
        base_key = prefix + "linear.parametrizations.weight.0.base"
        original_key = prefix + "linear.parametrizations.weight.original"
        if self.rank < self.size and base_key in state_dict and original_key in state_dict:
            legacy = parametrizations.orthogonal(nn.Linear(self.size, self.rank, bias=False))
            legacy.to(state_dict[original_key].dtype).load_state_dict({
                "parametrizations.weight.original": state_dict.pop(original_key),
                "parametrizations.weight.0.base": state_dict.pop(base_key)})
            with torch.no_grad():
                self.linear.weight = legacy.weight.to(self.linear.parametrizations.weight.original.dtype)
            state_dict[original_key] = self.linear.parametrizations.weight.original.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _subspace_slice(subspace, size: int) -> slice:
    """`subspace` (a size k, or a slice) as a slice of 0..size; out of range is an error, never clamped."""
    if isinstance(subspace, int) and not isinstance(subspace, bool):
        if not 1 <= subspace <= size:
            raise InterventionError(f"subspace size must be in 1..{size} (the rotation's rank), got {subspace}")
        subspace = slice(0, subspace)
    if not isinstance(subspace, slice):
        raise InterventionError(f"subspace must be an int (its size) or a slice, got {subspace!r}")
    start, stop, step = subspace.indices(size)
    out_of_range = any(v is not None and not -size <= v <= size for v in (subspace.start, subspace.stop))
    if step != 1 or stop <= start or out_of_range:
        raise InterventionError(f"subspace must be a non-empty slice of 0..{size}, got {subspace}")
    return slice(start, stop)


class RotatedSubspace(Intervention):
    """DAS: interchange the `subspace` coordinates of R·h, keep the rest of the base.

    new = base + (source - base) Rₖᵀ Rₖ, with Rₖ the subspace's rows of the orthogonal R. Several
    variables can share one `Rotation` with disjoint subspaces (`with_subspace`). The hand-written
    form: it creates its rotation when none is given and takes a contiguous subspace (a size k = the
    first k rows, or a slice); `metrics.RotatedDims` is the alignment-driven form (any rows, a shared
    rotation always).
    """

    def __init__(self, size: int, subspace: int | slice, rotation: Rotation | None = None):
        super().__init__()
        self.rotation = rotation if rotation is not None else Rotation(size)
        if self.rotation.size != size:
            raise InterventionError(f"rotation has size {self.rotation.size}, expected {size}")
        self.subspace = _subspace_slice(subspace, self.rotation.rank)

    def with_subspace(self, subspace: int | slice) -> "RotatedSubspace":
        """Another intervention on the same (shared) rotation, interchanging a different subspace."""
        return RotatedSubspace(self.rotation.size, subspace, rotation=self.rotation)

    def forward(self, base, source=None):
        source = _need(source, "RotatedSubspace")
        basis = self.rotation.weight[self.subspace].to(base.device, base.dtype)  # [k, size], on the site's device
        return base + ((source - base) @ basis.T) @ basis


class LowRankRotatedSubspace(RotatedSubspace):
    """DAS with only the k interchanged directions stored: R [k, size] with orthonormal rows.

    Its state (and a saved file) is one [k, size] tensor, from which R is recomputed exactly.
    """

    def __init__(self, size: int, rank: int):
        super().__init__(size, rank, rotation=Rotation(size, rank=rank))
