"""`Site`: a named place in a model plus optional selectors (positions, heads, dims).

Selectors become broadcastable index tensors once per call (`Site.index`), never Python loops
inside hooks. A site's value has shape [batch, seq, hidden] (or [batch, seq, heads, head_dim] for
head sites, or [batch, hidden] for non-sequence modules); selecting keeps the axes' order. The one
exception is the attention pattern [batch, heads, q, k] (`Layout.PATTERN`): heads select axis 1,
positions the query axis 2, dims the key axis 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .errors import SelectorError

Positions = Union[None, tuple, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """Which axis of a 4-D site value the `positions` and `heads` selectors index (dims: the last)."""

    positions: int
    heads: int


Layout.TOKENS = Layout(positions=1, heads=2)   # [batch, seq, (heads,) dims]: every site but one
Layout.PATTERN = Layout(positions=2, heads=1)  # [batch, heads, q, k]: the attention pattern
Dims = Union[None, tuple, slice]


def _freeze_ints(value, what: str):
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (str, bytes)):
        raise SelectorError(f"{what} must be a list of ints, got {value!r}")
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise SelectorError(f"{what} must be a list of ints, got {value!r}") from e
    if not out:
        raise SelectorError(f"{what} must not be empty (use None to select all)")
    return out


@dataclass(frozen=True, eq=False)
class Site:
    """A named intervention site, e.g. ``Site("layers.3.output", positions=[0, 4])``.

    positions: ints (the same for every example) or a LongTensor [batch, k] (per example);
    heads: head indices (on ``attention_heads``, ``queries``, ``attention_pattern``; key/value heads
    on ``keys`` and ``values``); dims: a slice or indices of the last (hidden) axis.
    ``None`` selects everything along that axis. On ``attention_pattern`` [batch, heads, q, k],
    positions select query rows and dims key columns.
    """

    name: str
    positions: Positions = None
    heads: tuple | None = None
    dims: Dims = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SelectorError(f"a site name must be a non-empty string, got {self.name!r}")
        pos = self.positions
        if isinstance(pos, torch.Tensor):
            if pos.dtype not in (torch.int64, torch.int32) or pos.dim() not in (1, 2):
                raise SelectorError(
                    f"per-example positions must be an integer tensor [batch, k], got dtype "
                    f"{pos.dtype} and shape {tuple(pos.shape)}"
                )
            if pos.dim() == 1:  # one position list shared by all examples
                pos = tuple(int(p) for p in pos.tolist())
        object.__setattr__(self, "positions", _freeze_ints(pos, "positions"))
        object.__setattr__(self, "heads", _freeze_ints(self.heads, "heads"))
        dims = self.dims
        if isinstance(dims, slice):
            if dims.step not in (None, 1):
                raise SelectorError(f"dims slices must have step 1, got {dims}")
        else:
            dims = _freeze_ints(dims, "dims")
        object.__setattr__(self, "dims", dims)

    # -- value semantics (tensors and slices are not hashable by value) -----------------
    def _key(self):
        pos = self.positions
        if isinstance(pos, torch.Tensor):
            pos = ("tensor", tuple(pos.shape), tuple(pos.flatten().tolist()))
        dims = self.dims
        if isinstance(dims, slice):
            dims = ("slice", dims.start, dims.stop)
        return (self.name, pos, self.heads, dims)

    def __eq__(self, other):
        if isinstance(other, str):  # a whole site equals its name, so results index by name too
            return self.is_whole and self.name == other
        return isinstance(other, Site) and self._key() == other._key()

    def __hash__(self):
        return hash(self.name) if self.is_whole else hash(self._key())

    def __repr__(self):
        parts = [repr(self.name)]
        for field in ("positions", "heads", "dims"):
            v = getattr(self, field)
            if v is not None:
                if isinstance(v, torch.Tensor):
                    v = f"tensor{tuple(v.shape)}"
                parts.append(f"{field}={v!r}")
        return f"Site({', '.join(parts)})"

    def __str__(self):
        return self.name

    @property
    def is_whole(self) -> bool:
        """True when no selector narrows the site."""
        return self.positions is None and self.heads is None and self.dims is None

    def with_positions(self, positions) -> "Site":
        return Site(self.name, positions, self.heads, self.dims)

    # -- selectors as index tensors ---------------------------------------------------------
    def num_positions(self, seq_len: int) -> int:
        if self.positions is None:
            return seq_len
        return len(self.positions) if isinstance(self.positions, tuple) else self.positions.shape[1]

    def dim_indices(self, size: int) -> torch.Tensor | None:
        if self.dims is None:
            return None
        if isinstance(self.dims, slice):
            start, stop, _ = self.dims.indices(size)
            return torch.arange(start, stop)
        return torch.tensor(self.dims)

    def index(self, shape: Sequence[int], device, layout: Layout = Layout.TOKENS) -> tuple | None:
        """Broadcastable advanced-index tuple selecting this site's slice of a value of `shape`.

        Returns None when the site selects the whole value. Positions index axis 1, heads axis 2
        (head sites), dims the last axis; on 4-D values `layout` may swap positions and heads
        (`Layout.PATTERN`: heads axis 1, query positions axis 2). Built once per (shape, device,
        layout) and kept: a hook that fires at every forward reuses it instead of rebuilding it.
        """
        if self.is_whole:
            return None
        key = (tuple(shape), str(device), layout)
        memo = self.__dict__.get("_index_memo")
        if memo is not None and memo[0] == key:
            return memo[1]
        idx = self._build_index(tuple(shape), device, layout)
        object.__setattr__(self, "_index_memo", (key, idx))
        return idx

    def _build_index(self, shape: tuple, device, layout: Layout) -> tuple:
        nd = len(shape)
        batch = shape[0]

        def col(t: torch.Tensor, axis: int) -> torch.Tensor:
            view = [1] * nd
            view[axis] = -1
            return t.to(device).view(view)

        idx: list = [None] * nd
        idx[0] = col(torch.arange(batch), 0)
        pos_axis = layout.positions if nd == 4 else 1
        if nd >= 3:
            pos = self.positions
            if pos is None:
                idx[pos_axis] = col(torch.arange(shape[pos_axis]), pos_axis)
            elif isinstance(pos, tuple):
                idx[pos_axis] = col(torch.tensor(pos), pos_axis)
            else:  # per example [batch, k]: batch on axis 0, k on the positions axis
                view = [1] * nd
                view[0], view[pos_axis] = pos.shape[0], pos.shape[1]
                idx[pos_axis] = pos.to(device=device, dtype=torch.long).view(view)
        if nd == 4:
            h = layout.heads
            heads = torch.tensor(self.heads) if self.heads is not None else torch.arange(shape[h])
            idx[h] = col(heads, h)
        dims = self.dim_indices(shape[-1])
        idx[nd - 1] = col(dims if dims is not None else torch.arange(shape[-1]), nd - 1)
        return tuple(idx)


SiteLike = Union[str, Site]


def as_site(site: SiteLike) -> Site:
    """Coerce a name or a Site into a Site."""
    if isinstance(site, Site):
        return site
    if isinstance(site, str):
        return Site(site)
    raise SelectorError(f"expected a site name (str) or a Site, got {type(site).__name__}: {site!r}")


def select(value: torch.Tensor, site: Site, layout: Layout = Layout.TOKENS) -> torch.Tensor:
    """The slice of `value` that `site` selects (differentiable)."""
    idx = site.index(value.shape, value.device, layout)
    return value if idx is None else value[idx]


def write(value: torch.Tensor, site: Site, new: torch.Tensor, layout: Layout = Layout.TOKENS) -> torch.Tensor:
    """`value` with `site`'s slice replaced by `new`, out of place (gradients reach both).

    `new` is moved to `value`'s device and cast to its dtype (a value set from another device, e.g.
    on a model dispatched by accelerate, lands where the model computes).
    """
    idx = site.index(value.shape, value.device, layout)
    new = new.to(device=value.device, dtype=value.dtype)
    if idx is None:
        return new.expand_as(value) if new.shape != value.shape else new
    target_shape = torch.broadcast_shapes(*(i.shape for i in idx))
    return value.index_put(idx, new.expand(target_shape))
