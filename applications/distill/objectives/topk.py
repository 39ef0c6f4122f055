"""KD and ATKD from a teacher's stored top-k logits (offline teacher logits, docs/distill.md).

Both rebuild a dense [batch, seq, vocab] teacher-logit tensor from what was stored (top-k values and
indices, the full log-sum-exp, the gold next token's logit) and hand it to the existing losses
(`kd.kd_loss`, `atkd.atkd_objective`): the KL itself is never re-implemented. Tokens outside the
stored set get a logit so low that their softmax weight is exactly 0 (exp underflows).

- KD: the teacher distribution is renormalised over its top k at every temperature (the listed
  logits, divided by T, softmaxed over k). Exact when k = vocab; an approximation otherwise.
- ATKD (T = 1): p_g is exact (the gold logit and the log-sum-exp are stored, the gold token is
  added when it is outside the top k); the non-target distribution p̂ is renormalised over the top k
  without the gold token. Built so: the top-k non-target logits are shifted so that their mass is
  exactly 1 − p_g, hence the dense log-sum-exp equals the stored one. Exact when k = vocab.
"""

from __future__ import annotations

import torch

from .atkd import ATKDConfig, atkd_objective
from .kd import kd_loss

#: How far below the smallest stored logit (in units of T) unlisted tokens sit: exp(-1e4) == 0 in fp32 and fp64.
_GAP = 1e4


def _empty(values: torch.Tensor, vocab: int, temperature: float, dtype) -> torch.Tensor:
    floor = values.to(dtype).amin(-1, keepdim=True) - _GAP * max(temperature, 1.0)
    return floor.expand(*values.shape[:-1], vocab).clone()


def topk_teacher_logits(values: torch.Tensor, indices: torch.Tensor, vocab: int, temperature: float = 1.0,
                        dtype=torch.float32) -> torch.Tensor:
    """Dense teacher logits [..., vocab] whose softmax at `temperature` is the top-k renormalised one."""
    return _empty(values, vocab, temperature, dtype).scatter_(-1, indices.long(), values.to(dtype))


def topk_kd_loss(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor,
                 temperature: float = 2.0) -> torch.Tensor:
    """`kd_loss` against the teacher's top-k renormalised distribution (exact when k = vocab)."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    teacher = topk_teacher_logits(values, indices, student_logits.shape[-1], temperature, dtype)
    return kd_loss(student_logits, teacher, mask, temperature)


def atkd_teacher_logits(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, gold: torch.Tensor,
                        targets: torch.Tensor, vocab: int, dtype=torch.float32) -> torch.Tensor:
    """Dense teacher logits [B, S, V] for ATKD at T = 1: exact p_g = exp(gold − lse) at the `targets`
    token (the stored gold logit at each position, i.e. the next token's for a causal LM; targets < 0
    are left as they are), and the top-k non-target tokens renormalised to carry 1 − p_g."""
    values, lse, gold = values.to(dtype), lse.to(dtype), gold.to(dtype)
    tgt = targets.clamp(min=0).unsqueeze(-1)
    has = targets >= 0
    is_g = (indices.long() == tgt) & has.unsqueeze(-1)
    log_p_g = (gold - lse).clamp(max=0)
    log_not_g = torch.log1p(-log_p_g.exp().clamp(max=1 - 1e-12)) if dtype == torch.float64 else \
        torch.log1p(-log_p_g.exp().clamp(max=1 - 1e-7))
    rest = values.masked_fill(is_g, float("-inf"))
    log_rest = torch.logsumexp(rest, -1) - lse  # log of the listed non-target mass (≤ log(1 − p_g))
    shift = torch.where(has, log_not_g - log_rest, torch.zeros_like(log_rest))
    shifted = torch.where(is_g, values, values + shift.unsqueeze(-1))
    dense = _empty(values, vocab, 1.0, dtype).scatter_(-1, indices.long(), shifted)
    return torch.where(has.unsqueeze(-1), dense.scatter(-1, tgt, gold.unsqueeze(-1)), dense)


def topk_atkd_objective(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                        lse: torch.Tensor, gold: torch.Tensor, labels: torch.Tensor, *,
                        config: ATKDConfig | None = None, check: bool = True):
    """`atkd_objective` (causal: position t scored against label t+1) on the stored teacher logits.

    `gold[:, t]` is the teacher's logit of token t+1 at position t (what `write_teacher_logits` stores)."""
    config = config or ATKDConfig()
    if config.temperature != 1.0 or config.reverse:
        from ..errors import DistillConfigError

        raise DistillConfigError("ATKD from offline teacher logits is forward ATKD at T = 1 ('atkd'): the stored "
                                 "log-sum-exp is at T = 1 and reverse KL needs every token's teacher probability")
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)  # position t -> label t+1
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    teacher = atkd_teacher_logits(values, indices, lse, gold, targets, student_logits.shape[-1], dtype)
    return atkd_objective(student_logits, teacher, labels, causal=True, config=config, check=check)
