"""Every distillation loss as a small pure function of tensors (no models, no trainer).

Conventions: logits [B, S, V], hidden states [B, S, H], `mask` [B, S] (1 = counted position),
labels [B, S] with -100 for ignored positions. Means are over counted positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DataError, IncompatibleModelsError

IGNORE = -100


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are upcast to float32; float32/64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    m = mask.bool()
    if not bool(m.any()):
        raise DataError("the loss mask selects no position: every token of the batch is padding or ignored")
    return m


def check_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Raise IncompatibleModelsError unless both logits share the vocabulary axis."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise IncompatibleModelsError(
            f"student vocabulary size {student_logits.shape[-1]} != teacher vocabulary size "
            f"{teacher_logits.shape[-1]}; distillation compares distributions over one vocabulary, so use the "
            "teacher's tokenizer and vocabulary for the student."
        )


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 2.0) -> torch.Tensor:
    """KL(teacher ‖ student) of the softened distributions, mean over masked positions, times T²."""
    check_vocab(student_logits, teacher_logits)
    m = _positions(mask)
    s = F.log_softmax(_wide(student_logits[m]) / temperature, dim=-1)
    t = F.log_softmax(_wide(teacher_logits[m]) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


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
    m = _positions(mask)
    return (1 - F.cosine_similarity(_wide(student_hidden[m]), _wide(teacher_hidden[m]), dim=-1)).mean()


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(agreeing, counted): positions where both models' argmax is the same, among masked ones."""
    m = mask.bool()
    same = (student_logits.argmax(-1) == teacher_logits.argmax(-1)) & m
    return int(same.sum()), int(m.sum())
