"""Deterministic random streams keyed by integers (seed, step, example index, ...).

Keying every draw by what it is for (not by how many draws came before) makes masking, pairing and
spans independent of the process layout (1 process or DDP) and of interruptions (exact resume).
"""

from __future__ import annotations

import random

import torch

_MOD = (1 << 61) - 1


def key(*parts: int) -> int:
    """A stable 61-bit hash of integers (Python's hash() of ints is stable too, but not mixed)."""
    h = 0x9E3779B97F4A7C15 % _MOD
    for p in parts:
        h = (h * 1_000_003 + (int(p) & ((1 << 63) - 1)) + 0x632BE59BD9B4E019) % _MOD
        h ^= h >> 29
    return h


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by `key(*parts)`."""
    return torch.Generator().manual_seed(key(*parts))


def rng(source: int | torch.Generator) -> random.Random:
    """A Python RNG for one stream: its draws are plain numbers (no tensor, so no device sync) on any device.

    `source` is an integer key or a torch generator made by `generator` (its seed is the key).
    """
    return random.Random(source if isinstance(source, int) else source.initial_seed())
