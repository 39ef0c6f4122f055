"""MLM masking exactly as DistilBERT / DIITO: 15% of tokens, 80/10/10, P(token) ∝ count^-0.7.

`token_weights` turns corpus counts into sampling weights (special tokens 0); `mlm_mask` picks,
per example, ceil(p · length) positions without replacement with those weights (Efraimidis–Spirakis
keys: the top-n of u^(1/w) is a weighted draw without replacement) and applies the 80/10/10 split.
The quota is per example rather than over the flattened batch (as the official code does), so a
batch split across devices is masked exactly as on one device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import seeding

IGNORE = -100


def token_weights(counts: torch.Tensor, special_ids: Sequence[int], smoothing: float = 0.7) -> torch.Tensor:
    """Sampling weight per vocabulary id: max(count, 1) ** -smoothing, 0 for special tokens."""
    weights = counts.double().clamp(min=1.0).pow(-smoothing)
    if len(special_ids):
        weights[torch.as_tensor(list(special_ids), dtype=torch.long)] = 0.0
    return weights


@dataclass(frozen=True)
class Masked:
    """A masked batch: new input ids and labels (the original id where predicted, else -100)."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def _padded_draws(r, n: int, width: int, vocab_size: int) -> tuple[list, list, list]:
    """One row's draws (key u, split action, random id) for its `n` tokens, padded to `width`."""
    pad = width - n
    return ([r.random() for _ in range(n)] + [0.5] * pad, [r.random() for _ in range(n)] + [1.0] * pad,
            [r.randrange(vocab_size) for _ in range(n)] + [0] * pad)


def mlm_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: torch.Tensor, mask_token_id: int,
             vocab_size: int, generators: Sequence, probability: float = 0.15,
             split: tuple = (0.8, 0.1, 0.1), lengths: Sequence[int] | None = None) -> Masked:
    """Mask each row with its own generator: ceil(probability · non-pad length) weighted picks, 80/10/10.

    Rows are right-padded (`attention_mask` 1 then 0). `lengths` (the rows' non-pad lengths, as the
    collator gives them) spares reading the mask back from the device; without it they are read once.
    The draws are plain Python numbers keyed by each row's generator; everything computed from the
    batch runs on the batch's device.
    """
    batch, seq = input_ids.shape
    if len(generators) != batch:
        raise ValueError(f"need one generator per row ({batch}), got {len(generators)}")
    device = input_ids.device
    if lengths is None:
        lengths = attention_mask.sum(1).tolist()  # one host read; training passes the collator's lengths
    draws = [_padded_draws(seeding.rng(g), int(n), seq, vocab_size) for g, n in zip(generators, lengths)]
    u, action = (torch.tensor([d[k] for d in draws], dtype=torch.float64, device=device) for k in (0, 1))
    random_ids = torch.tensor([d[2] for d in draws], dtype=input_ids.dtype, device=device)
    ids = input_ids
    valid = attention_mask.bool()
    w = weights.to(device=device, dtype=torch.float64)[ids] * valid
    quota = torch.tensor([math.ceil(probability * int(n)) for n in lengths], device=device)
    quota = torch.minimum(quota, (w > 0).sum(1))
    keys = torch.where(w > 0, u.clamp_min(1e-300).log() / w, torch.full_like(u, -math.inf))
    order = keys.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(seq, device=device).expand(batch, seq).contiguous())
    chosen = rank < quota[:, None]
    to_mask = chosen & (action < split[0])
    to_random = chosen & (action >= split[0] + split[1])
    new = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    new = torch.where(to_random, random_ids, new)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return Masked(new, labels)


def clm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels: the input ids, -100 on padding (the model's loss shifts them)."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE)
