"""A user-defined intervention and the outputs the save/load tests compare, importable by a fresh process."""

from __future__ import annotations

import torch
from torch import nn

import interventions as iv


class GatedMix(iv.Intervention, saved_name="tests.GatedMix"):
    """base + sigmoid(gate) * (source - base) @ proj, with a shared Rotation applied on top."""

    def __init__(
        self,
        size: int,
        *,
        rotation: iv.Rotation,
        dims=slice(0, 2),
        init_gate: float = 0.0,
        offset: torch.Tensor | None = None,
    ):
        super().__init__()
        self.rotation = rotation
        self.gate = nn.Parameter(torch.full((size,), init_gate))
        self.proj = nn.Linear(size, size, bias=False)  # a plain submodule: saved with its parent's state
        self.dims = dims
        self.register_buffer("offset", torch.zeros(size) if offset is None else offset.clone())

    def forward(self, base, source=None):
        basis = self.rotation.weight[self.dims].to(base.dtype)
        mixed = base + torch.sigmoid(self.gate).to(base.dtype) * self.proj(source - base)
        return mixed + ((source - base) @ basis.T) @ basis + self.offset.to(base.dtype)


SIZE = 16


def outputs(interventions: dict) -> dict[str, torch.Tensor]:
    """Each intervention applied to the same seeded base and source values."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(2, 3, SIZE, generator=gen, dtype=torch.float64)
    source = torch.randn(2, 3, SIZE, generator=gen, dtype=torch.float64)
    out = {}
    for i, (site, module) in enumerate(interventions.items()):
        b, s = (base[..., :2], source[..., :2]) if isinstance(module, iv.Constant) else (base, source)
        out[str(i)] = module(b, s).detach().contiguous()
    return out
