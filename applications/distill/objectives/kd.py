"""Every distillation loss as a small pure function of tensors (no models, no trainer).

Conventions: logits [B, S, V], hidden states [B, S, H], `mask` [B, S] (1 = counted position),
labels [B, S] with -100 for ignored positions. Means are over counted positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IncompatibleModelsError

IGNORE = -100


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are upcast to float32; float32/64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _weights(mask: torch.Tensor, dtype) -> torch.Tensor:
    """Per-position weights 1/count over the counted positions (mask != 0), 0 elsewhere.

    No boolean indexing and no host read: a mask that selects nothing gives 0/0 = NaN, which the
    trainer's one non-finite check per step reports.
    """
    m = (mask != 0).to(dtype)
    return m / m.sum()


def check_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Raise IncompatibleModelsError unless both logits share the vocabulary axis."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise IncompatibleModelsError(
            f"student vocabulary size {student_logits.shape[-1]} != teacher vocabulary size "
            f"{teacher_logits.shape[-1]}; distillation compares distributions over one vocabulary, so use the "
            "teacher's tokenizer and vocabulary for the student."
        )


class _SoftKL(torch.autograd.Function):
    """T² · Σ_pos w_pos · KL(softmax(t/T) ‖ softmax(s/T)), with gradient T · w · (q − p) for `s` only.

    Fused: the gradient is formed in the forward pass and is the one vocabulary-sized tensor kept for
    backward (autograd would keep both log-softmax outputs and the products, and recompute in backward).
    """

    @staticmethod
    def forward(ctx, s, t, w, temperature):
        log_q = torch.log_softmax(_wide(s) / temperature, dim=-1)
        p = torch.log_softmax(_wide(t) / temperature, dim=-1)
        d = p - log_q
        p.exp_()
        kl = d.mul_(p).sum(-1)
        del d
        w = w.to(kl.dtype)
        grad = log_q.exp_().sub_(p).mul_((w * temperature)[..., None])
        ctx.save_for_backward(grad)
        ctx.dtype = s.dtype
        return (kl * w).sum() * temperature ** 2

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.dtype), None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 2.0) -> torch.Tensor:
    """KL(teacher ‖ student) of the softened distributions, mean over masked positions, times T².

    Logits [..., V] with `mask` over their leading axes ([B, S] for tokens, [B] for sequences).
    """
    check_vocab(student_logits, teacher_logits)
    return _SoftKL.apply(student_logits, teacher_logits.detach(), _weights(mask, torch.float64 if
                         student_logits.dtype == torch.float64 else torch.float32), temperature)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the positions whose label is not -100 (the masked ones)."""
    return F.cross_entropy(_wide(logits.flatten(0, 1)), labels.flatten(), ignore_index=IGNORE)


def clm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts label t+1 (labels -100 on padding)."""
    return F.cross_entropy(_wide(logits[:, :-1].flatten(0, 1)), labels[:, 1:].flatten(), ignore_index=IGNORE)


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of 1 - cos(student, teacher) (CosineEmbeddingLoss with target +1)."""
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise IncompatibleModelsError(
            f"cosine loss needs equal hidden sizes: student {student_hidden.shape[-1]}, teacher "
            f"{teacher_hidden.shape[-1]}; ask for a learned projection (--cos-projection) or drop 'cos'."
        )
    cos = F.cosine_similarity(_wide(student_hidden), _wide(teacher_hidden).to(_wide(student_hidden).dtype), dim=-1)
    return ((1 - cos) * _weights(mask, cos.dtype)).sum()


def nll_sum(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of predicted tokens) of a batch, as tensors: perplexity's parts.

    Causal LMs predict label t+1 at position t; masked LMs the labelled positions; -100 is ignored.
    """
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    total = F.cross_entropy(_wide(logits.flatten(0, -2)), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return total, (labels != IGNORE).sum()


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(agreeing, counted): positions where both models' argmax is the same, among masked ones."""
    m = mask.bool()
    same = (student_logits.argmax(-1) == teacher_logits.argmax(-1)) & m
    return int(same.sum()), int(m.sum())
