"""Who is whose source, and which positions are swapped: the interchange plan of one DIITO step.

Sources are other examples of the same batch (a random cyclic derangement of the rows). Per example,
a span of int(fraction · min(len_base, len_source)) positions is drawn independently in base and
source: `consecutive` (one contiguous run), `random` (any non-pad positions, in order) or `masked`
(masked positions only). The k-th base position receives the k-th source position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import DistillConfigError, SpanError


def source_permutation(batch: int, generator: torch.Generator) -> torch.Tensor:
    """perm[i] = the row whose activations example i receives; perm[i] != i whenever batch > 1."""
    order = torch.randperm(batch, generator=generator)
    perm = torch.empty(batch, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def span_length(len_base: int, len_source: int, fraction: float = 0.3) -> int:
    """int(fraction · min(len_base, len_source)); raises SpanError when that is 0."""
    n = int(fraction * min(len_base, len_source))
    if n < 1:
        need = int(1 / fraction - 1e-9) + 1
        raise SpanError(
            f"sequences of {len_base} and {len_source} tokens are too short for an interchange span "
            f"({fraction:g} x {min(len_base, len_source)} < 1); every sequence needs at least {need} tokens "
            "(drop shorter lines, or raise span_fraction)."
        )
    return n


def _pick(candidates: torch.Tensor, n: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """n positions out of `candidates` (sorted 1-D): a contiguous run of them, or a random sorted subset."""
    if mode == "consecutive":
        start = int(torch.randint(len(candidates) - n + 1, (1,), generator=generator))
        return candidates[start:start + n]
    chosen = torch.randperm(len(candidates), generator=generator)[:n]
    return candidates[chosen.sort().values]


@dataclass(frozen=True)
class InterchangePlan:
    """perm [B]: source row of each example; base_pos / source_pos [B, m]: paired positions; valid [B, m]."""

    perm: torch.Tensor
    base_pos: torch.Tensor
    source_pos: torch.Tensor
    valid: torch.Tensor

    def take(self, seq_len: int) -> torch.Tensor:
        """[B, seq]: for each base position, the source position it receives, or -1 (kept)."""
        take = torch.full((self.perm.shape[0], seq_len), -1, dtype=torch.long)
        rows = torch.arange(self.perm.shape[0])[:, None].expand_as(self.base_pos)
        take[rows[self.valid], self.base_pos[self.valid]] = self.source_pos[self.valid]
        return take

    def mix(self, base: torch.Tensor, source_batch: torch.Tensor) -> torch.Tensor:
        """`base` [B, S, H] with its span replaced by the sources' spans read from `source_batch` [B, S', H].

        `source_batch` holds every example's own values; row perm[i] is example i's source.
        Out of place and differentiable in both arguments (each source value is used once).
        """
        take = self.take(base.shape[1]).to(base.device)
        src = source_batch[self.perm.to(base.device)]
        gathered = src.gather(1, take.clamp(min=0)[..., None].expand(-1, -1, src.shape[-1]))
        return torch.where((take >= 0)[..., None], gathered.to(base.dtype), base)


def draw_plan(attention_mask: torch.Tensor, generators: Sequence[torch.Generator], perm: torch.Tensor,
              mode: str = "consecutive", fraction: float = 0.3, labels: torch.Tensor | None = None) -> InterchangePlan:
    """Spans for each example i (base) and its source perm[i], drawn with example i's generator."""
    if mode not in ("consecutive", "random", "masked"):
        raise DistillConfigError(f"unknown span mode {mode!r}; valid: consecutive, random, masked")
    if mode == "masked" and labels is None:
        raise DistillConfigError("span mode 'masked' needs masked-LM labels (it is not available for causal LMs)")
    mask = attention_mask.cpu().bool()
    lengths = mask.sum(1).tolist()
    targets = (labels.cpu() != -100) if labels is not None else None
    base_rows, src_rows = [], []
    for i, g in enumerate(generators):
        j = int(perm[i])
        n = span_length(lengths[i], lengths[j], fraction)
        if mode == "masked":
            cand_b = torch.nonzero(targets[i] & mask[i]).flatten()
            cand_s = torch.nonzero(targets[j] & mask[j]).flatten()
            n = min(n, len(cand_b), len(cand_s))
            if n < 1:
                raise SpanError(f"example {i} or its source {j} has no masked position for a 'masked' span")
        else:
            cand_b = torch.nonzero(mask[i]).flatten()
            cand_s = torch.nonzero(mask[j]).flatten()
        mode_ = "random" if mode == "masked" else mode
        base_rows.append(_pick(cand_b, n, mode_, g))
        src_rows.append(_pick(cand_s, n, mode_, g))
    width = max(len(r) for r in base_rows)
    pad = lambda rows: torch.stack([torch.cat([r, r.new_zeros(width - len(r))]) for r in rows])
    valid = torch.stack([torch.arange(width) < len(r) for r in base_rows])
    return InterchangePlan(perm.clone(), pad(base_rows), pad(src_rows), valid)
