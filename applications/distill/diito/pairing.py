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

from .. import seeding
from ..errors import DistillConfigError, SpanError


def source_order(batch: int, generator) -> list[int]:
    """perm[i] = the row whose activations example i receives (a random cyclic derangement), as a list."""
    order = list(range(batch))
    seeding.rng(generator).shuffle(order)
    perm = [0] * batch
    for k, row in enumerate(order):
        perm[row] = order[(k + 1) % batch]
    return perm


def source_permutation(batch: int, generator, device=None) -> torch.Tensor:
    """`source_order` as a tensor: perm[i] != i whenever batch > 1."""
    return torch.tensor(source_order(batch, generator), dtype=torch.long, device=device)


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


def _pick(candidates: list[int], n: int, mode: str, r) -> list[int]:
    """n positions out of `candidates` (sorted): a contiguous run of them, or a random sorted subset."""
    if mode == "consecutive":
        start = r.randrange(len(candidates) - n + 1)
        return candidates[start:start + n]
    return sorted(r.sample(candidates, n))


@dataclass(frozen=True)
class InterchangePlan:
    """perm [B]: source row of each example; base_pos / source_pos [B, m]: paired positions; valid [B, m]."""

    perm: torch.Tensor
    base_pos: torch.Tensor
    source_pos: torch.Tensor
    valid: torch.Tensor

    def take(self, seq_len: int) -> torch.Tensor:
        """[B, seq]: for each base position, the source position it receives, or -1 (kept)."""
        device = self.base_pos.device
        take = torch.full((self.perm.shape[0], seq_len + 1), -1, dtype=torch.long, device=device)
        # Padding slots of the plan write into an extra column that is cut off (no boolean indexing:
        # that would read the mask back to the host).
        cols = torch.where(self.valid, self.base_pos, torch.full_like(self.base_pos, seq_len))
        take.scatter_(1, cols, torch.where(self.valid, self.source_pos, torch.full_like(self.source_pos, -1)))
        return take[:, :seq_len]

    def mix(self, base: torch.Tensor, source_batch: torch.Tensor) -> torch.Tensor:
        """`base` [B, S, H] with its span replaced by the sources' spans read from `source_batch` [B, S', H].

        `source_batch` holds every example's own values; row perm[i] is example i's source.
        Out of place and differentiable in both arguments (each source value is used once).
        """
        take = self.take(base.shape[1])
        src = source_batch[self.perm]
        gathered = src.gather(1, take.clamp(min=0)[..., None].expand(-1, -1, src.shape[-1]))
        return torch.where((take >= 0)[..., None], gathered.to(base.dtype), base)


def draw_plan(attention_mask: torch.Tensor, generators: Sequence, perm: torch.Tensor | list[int], mode: str = "consecutive",
              fraction: float = 0.3, labels: torch.Tensor | None = None,
              lengths: Sequence[int] | None = None) -> InterchangePlan:
    """Spans for each example i (base) and its source perm[i], drawn with example i's generator.

    With `lengths` (right-padded rows, as the collator gives them) and a mode other than 'masked',
    nothing is read back from the device: the plan is built from Python numbers and sent once.
    """
    if mode not in ("consecutive", "random", "masked"):
        raise DistillConfigError(f"unknown span mode {mode!r}; valid: consecutive, random, masked")
    if mode == "masked" and labels is None:
        raise DistillConfigError("span mode 'masked' needs masked-LM labels (it is not available for causal LMs)")
    device = attention_mask.device
    if lengths is None or mode == "masked":  # read the positions back (one host transfer)
        mask = attention_mask.cpu().bool()
        lengths = mask.sum(1).tolist()
        positions = [torch.nonzero(row).flatten().tolist() for row in mask]
        if mode == "masked":
            targets = labels.cpu() != -100
            masked = [torch.nonzero(t & m).flatten().tolist() for t, m in zip(targets, mask)]
    else:
        positions = [list(range(int(n))) for n in lengths]
    order = [int(j) for j in perm] if isinstance(perm, list) else perm.tolist()
    base_rows, src_rows = [], []
    for i, g in enumerate(generators):
        r = seeding.rng(g)
        j = order[i]
        n = span_length(int(lengths[i]), int(lengths[j]), fraction)
        if mode == "masked":
            cand_b, cand_s = masked[i], masked[j]
            n = min(n, len(cand_b), len(cand_s))
            if n < 1:
                raise SpanError(f"example {i} or its source {j} has no masked position for a 'masked' span")
        else:
            cand_b, cand_s = positions[i], positions[j]
        mode_ = "random" if mode == "masked" else mode
        base_rows.append(_pick(cand_b, n, mode_, r))
        src_rows.append(_pick(cand_s, n, mode_, r))
    width = max(len(x) for x in base_rows)

    def pad(rows):
        return torch.tensor([x + [0] * (width - len(x)) for x in rows], dtype=torch.long, device=device)

    valid = torch.tensor([[k < len(x) for k in range(width)] for x in base_rows], dtype=torch.bool, device=device)
    return InterchangePlan(torch.tensor(order, dtype=torch.long, device=device), pad(base_rows), pad(src_rows), valid)
