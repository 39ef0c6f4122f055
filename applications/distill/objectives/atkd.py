"""ATKD (Zhong et al., ACL 2024): KD split into target (TKD) and non-target (DKD) parts, weighted by
the teacher's uncertainty. Everything is per token over [batch, seq, vocab] tensors, in fp32, with no
gathered [N, vocab] copies of the logits.

For target g, p = softmax(z_T/τ), q = softmax(z_S/τ):
    KL(p‖q) = KL(b_p‖b_q) + (1 − p_g) · KL(p̂‖q̂)  =  TKD + UNC · DKD,
with b_· = [x_g, 1 − x_g] and x̂_i = x_i / (1 − x_g) over i ≠ g. Logs of (1 − x_g) are taken as a
logsumexp over the non-target classes, which stays exact when x_g → 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import DataError, DistillConfigError


def _check(teacher_logits, student_logits, targets, mask=None):
    if teacher_logits.shape != student_logits.shape:
        raise DataError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
            "differ; both must be [batch, seq, vocab] over the same vocabulary"
        )
    if targets.shape != teacher_logits.shape[:-1]:
        raise DataError(f"targets {tuple(targets.shape)} must be [batch, seq] = {tuple(teacher_logits.shape[:-1])}")
    vocab = teacher_logits.shape[-1]
    valid = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        values = sorted({int(t) for t in targets[bad].tolist()})[:5]
        raise DataError(
            f"targets {values} outside the vocabulary (valid 0..{vocab - 1}); mask those positions out "
            "(e.g. label -100 with mask = labels != -100)"
        )


def _parts(log_x: torch.Tensor, target: torch.Tensor):
    """log x_g, log(1 − x_g) and log x̂ (the non-target distribution; −inf at g)."""
    log_g = log_x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    is_g = torch.zeros_like(log_x, dtype=torch.bool).scatter_(-1, target.unsqueeze(-1), True)
    log_rest = log_x.masked_fill(is_g, float("-inf"))
    log_not_g = torch.logsumexp(log_rest, dim=-1)
    return log_g, log_not_g, log_rest - log_not_g.unsqueeze(-1), is_g


def _binary_kl(log_a, log_not_a, log_b, log_not_b):
    return log_a.exp() * (log_a - log_b) + log_not_a.exp() * (log_not_a - log_not_b)


def kd_decomposition(teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor, *,
                     reverse: bool = False, temperature: float = 1.0):
    """Per-token ``(tkd, dkd, unc)``, each [batch, seq], with KL = tkd + unc · dkd.

    Forward KL(p_T ‖ q_S) by default; ``reverse=True`` decomposes KL(q_S ‖ p_T), whose `unc` is the
    student's 1 − q_g (ATKD still ranks tokens by the teacher's uncertainty, see `atkd_loss`).
    """
    targets = targets.clamp(min=0)  # masked positions (e.g. -100) give finite, ignored values
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if reverse:
        log_p, log_q = log_q, log_p
    p_g, p_not, log_p_hat, is_g = _parts(log_p, targets)
    q_g, q_not, log_q_hat, _ = _parts(log_q, targets)
    tkd = _binary_kl(p_g, p_not, q_g, q_not)
    diff = (log_p_hat - log_q_hat).masked_fill(is_g, 0.0)
    dkd = (log_p_hat.exp() * diff).sum(-1)
    return tkd, dkd, p_not.exp()


Split = Literal["batch", "sequence", "global"]


@dataclass(frozen=True)
class ATKDConfig:
    """ATKD knobs: L = λ · mean_easy(DKD) + (1 − λ) · mean_hard(TKD + DKD)."""

    lam: float = 0.2
    hard_fraction: float = 0.5
    temperature: float = 1.0
    reverse: bool = False
    split: Split = "batch"  # where the hard/easy cut is taken: per batch, per sequence, or a given threshold

    def __post_init__(self):
        if not 0.0 <= self.lam <= 1.0:
            raise DistillConfigError(f"atkd lambda must be in [0, 1], got {self.lam}")
        if not 0.0 < self.hard_fraction < 1.0:
            raise DistillConfigError(f"atkd hard fraction must be in (0, 1), got {self.hard_fraction}")
        if self.split not in ("batch", "sequence", "global"):
            raise DistillConfigError(f"atkd split must be 'batch', 'sequence' or 'global', got {self.split!r}")


def teacher_uncertainty(teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """UNC = 1 − p_g per token (not the entropy)."""
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _parts(log_p, targets.clamp(min=0))[1].exp()


def hard_mask(unc: torch.Tensor, valid: torch.Tensor, fraction: float, split: Split = "batch",
              threshold: float | None = None) -> torch.Tensor:
    """Hard tokens: the `fraction` of valid tokens with the highest uncertainty (ties broken by order).

    split="batch" ranks all valid tokens of the batch, "sequence" each row, "global" compares against
    a given `threshold`.
    """
    if split == "global":
        if threshold is None:
            raise DistillConfigError("split='global' needs a threshold")
        return valid & (unc >= threshold)
    rows = unc.masked_fill(~valid, float("-inf"))
    if split == "batch":
        rows = rows.reshape(1, -1)
    counts = valid.reshape(rows.shape).sum(-1, keepdim=True)
    k = torch.ceil(counts * fraction).long()
    rank = rows.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = most uncertain
    return ((rank < k) & valid.reshape(rows.shape)).reshape(unc.shape)


def atkd_loss(teacher_logits, student_logits, targets, mask, config: ATKDConfig = ATKDConfig(), *,
              threshold: float | None = None, check: bool = True):
    """The ATKD objective over the valid (mask == 1) tokens; returns (loss, stats dict of 0-d tensors).

    `check` validates targets and the mask (reads them back from the device); training passes False:
    its targets are token ids of the tokenizer, and an empty mask gives NaN, caught by the trainer.
    """
    valid = mask.bool()
    if check:
        _check(teacher_logits, student_logits, targets, mask)
        if not bool(valid.any()):
            raise DataError("ATKD got a batch with no valid tokens (all padding / ignored labels)")
    tkd, dkd, _ = kd_decomposition(teacher_logits, student_logits, targets,
                                   reverse=config.reverse, temperature=config.temperature)
    unc = teacher_uncertainty(teacher_logits.detach(), targets, config.temperature)
    hard = hard_mask(unc, valid, config.hard_fraction, config.split, threshold)
    easy = valid & ~hard

    def mean(x, m):
        return (x * m).sum() / m.sum().clamp(min=1)

    loss = config.lam * mean(dkd, easy) + (1.0 - config.lam) * mean(tkd + dkd, hard)
    stats = {"atkd_hard_share": (hard.sum() / valid.sum()).detach(), "teacher_unc": mean(unc, valid).detach()}
    return loss, stats


#: Why each other KD loss is refused (docs/atkd.md gives the math).
OTHER_KD = {
    "tvd": "total variation has no exact decomposition: sum_i |p_i - q_i| over i != g does not factor into "
           "an uncertainty weight times a distance of the renormalised non-target distributions",
    "skew_kl": "skew KL, KL(p || a*p + (1-a)*q), does split exactly by KL's chain rule (with the mixture as "
               "the reference), but is not implemented",
    "skew_reverse_kl": "skew reverse KL splits exactly by KL's chain rule (with the mixture as the reference), "
                       "but is not implemented",
    "gjsd": "generalised JSD splits into two chain-rule terms with two different uncertainty weights "
            "(teacher's and student's), so it has no single TKD + UNC*DKD form; not implemented",
}


def unsupported_kd(name: str):
    """KD losses other than forward / reverse KL are refused with the reason, not approximated."""
    why = OTHER_KD.get(name, "it is not a KD loss this module knows")
    raise DistillConfigError(
        f"ATKD wraps forward KL ('atkd') and reverse KL ('atkd_reverse') only; {name!r}: {why} "
        "(no exact decomposition into TKD + UNC*DKD is used; see docs/atkd.md)"
    )


def atkd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                   causal: bool, config: ATKDConfig = ATKDConfig(), check: bool = True):
    """ATKD on a training batch's logits and LM labels (-100 = no target); returns (loss, stats).

    Causal LMs: position t is scored against label t+1 (the next token), like the CLM loss.
    Masked LMs: only positions with a label (the masked ones) have a target token, so only they count.
    """
    if causal:
        student_logits, teacher_logits, labels = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    return atkd_loss(teacher_logits, student_logits, labels, labels != -100, config, check=check)
