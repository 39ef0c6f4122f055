"""TED (Liang et al., ICML 2023): task-aware filters on every interval-th layer of teacher and student.

Stage 1 trains, with the model frozen, one filter plus one task head per filtered layer on the task
loss averaged over filters (teacher first, then student). Stage 2 freezes the teacher and its filters
and trains the student and its filters on
    L_task + α_KL · T² · KL(teacher ‖ student) + α_MSE · mean_m MSE(f_S,m(h_S,m), f_T,m(h_T,m)),
with padding masked out of the MSE. KD (no filters) and LWD (raw hidden states through a learned
projection) are the same code path with other switches. Filters and heads never reach the exported
model: they live in `TEDFilters`, apart from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, DistillConfigError
from .kd import clm_loss, kd_loss

Task = Literal["classification", "lm"]


def filtered_layers(num_layers: int, interval: int) -> list[int]:
    """0-based blocks that carry a filter: every `interval`-th block, ending at the last one."""
    if interval < 1 or num_layers % interval:
        raise DistillConfigError(
            f"filter interval {interval} does not divide the model's {num_layers} layers "
            f"(valid intervals: {[i for i in range(1, num_layers + 1) if num_layers % i == 0]})"
        )
    return list(range(interval - 1, num_layers, interval))


def pair_layers(teacher_layers: int, teacher_interval: int, student_layers: int, student_interval: int):
    """(teacher block, student block) per filter m; the two sides must have as many filters."""
    t = filtered_layers(teacher_layers, teacher_interval)
    s = filtered_layers(student_layers, student_interval)
    if len(t) != len(s):
        raise DistillConfigError(
            f"teacher ({teacher_layers} layers, interval {teacher_interval}) has {len(t)} filters but student "
            f"({student_layers} layers, interval {student_interval}) has {len(s)}; choose intervals so that "
            f"teacher_layers / teacher_interval == student_layers / student_interval"
        )
    return list(zip(t, s))


@dataclass(frozen=True)
class TEDConfig:
    """TED knobs; `mode` picks TED, plain KD (no filters) or LWD (raw states, learned projection)."""

    mode: Literal["ted", "kd", "lwd"] = "ted"
    teacher_interval: int = 2
    student_interval: int = 1
    alpha_task: float = 1.0
    alpha_kl: float = 1.0
    alpha_mse: float = 100.0
    temperature: float = 2.0


def make_filter(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    raise DistillConfigError(f"filter must be 'linear' or 'mlp', got {kind!r}")


class TaskHead(nn.Module):
    """Classification (first-token pooler + classifier) or LM (a linear to the vocabulary) head."""

    def __init__(self, task: Task, width: int, num_outputs: int):
        super().__init__()
        self.task = task
        if task == "classification":
            self.pooler = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        elif task != "lm":
            raise DistillConfigError(f"task must be 'classification' or 'lm', got {task!r}")
        self.out = nn.Linear(width, num_outputs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return self.out(self.pooler(h[:, 0]))
        return self.out(h)


class TEDFilters(nn.Module):
    """One filter (and, for stage 1, one task head) per filtered layer of one model.

    Without `task` there are no heads: LWD's projections are filters that never learn a task.
    """

    def __init__(self, layers: list[int], d_model: int, width: int, kind: str, task: Task | None = None,
                 num_outputs: int | None = None):
        super().__init__()
        self.layers = list(layers)
        self.filters = nn.ModuleList(make_filter(kind, d_model, width) for _ in layers)
        self.heads = nn.ModuleList(TaskHead(task, width, num_outputs) for _ in layers) if task else nn.ModuleList()

    def forward(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Filtered states, one per filtered layer; `hidden` holds those layers' outputs in order."""
        if len(hidden) != len(self.filters):
            raise DistillConfigError(f"got {len(hidden)} hidden states for {len(self.filters)} filters")
        return [f(h) for f, h in zip(self.filters, hidden)]


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    """Classification: cross-entropy on the class ids; LM: next-token cross-entropy (objectives.clm_loss)."""
    if task == "classification":
        return F.cross_entropy(logits, labels)
    return clm_loss(logits, labels)


def stage1_loss(filters: TEDFilters, hidden: list[torch.Tensor], labels: torch.Tensor, task: Task,
                call=None) -> torch.Tensor:
    """Task loss averaged over filters (each filter with its own head); `call` runs the filters (a DDP wrapper)."""
    filtered = (call or filters)(hidden)
    losses = [task_loss(head(h), labels, task) for head, h in zip(filters.heads, filtered)]
    return torch.stack(losses).mean()


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, check: bool = True) -> torch.Tensor:
    """Mean squared error over non-padding tokens ([batch, seq, d]; mask [batch, seq]).

    `check` refuses an all-padding mask (a host read); training passes False (NaN is caught there).
    """
    err = (a - b).pow(2).mean(-1)
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    if check and float(m.sum()) == 0:
        raise DataError("MSE over a batch with no non-padding tokens")
    return (err * m).sum() / m.sum()


def kd_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · KL(teacher ‖ student) at temperature T, averaged over examples (or unmasked tokens): objectives.kd_loss."""
    if mask is None or mask.dim() != student_logits.dim() - 1:
        mask = torch.ones(student_logits.shape[:-1], device=student_logits.device)
    return kd_loss(student_logits, teacher_logits, mask, temperature)


def stage2_loss(config: TEDConfig, *, student_logits, teacher_logits, labels, task: Task,
                student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                mask: torch.Tensor | None, student_filters: nn.Module | None = None,
                teacher_filters: nn.Module | None = None, check: bool = True) -> tuple[torch.Tensor, dict]:
    """The stage-2 objective for TED / KD / LWD; returns (loss, parts as detached 0-d tensors)."""
    parts = {
        "task": task_loss(student_logits, labels, task),
        "kl": kd_kl(teacher_logits.detach(), student_logits, config.temperature,
                    mask if task == "lm" else None),
    }
    if config.mode != "kd":
        if student_filters is None:
            raise DistillConfigError(
                f"mode {config.mode!r} needs student filters (TED: run stage 1 first and pass its filters; "
                "LWD: a projection)"
            )
        if config.mode == "ted":
            if teacher_filters is None:
                raise DistillConfigError("TED stage 2 needs the teacher's stage-1 filters; run `ted stage1` first")
            with torch.no_grad():
                target = teacher_filters(teacher_states)
        else:  # lwd: raw teacher states, the student's projected to the teacher's width
            target = [t.detach() for t in teacher_states]
        mine = student_filters(student_states)
        parts["mse"] = torch.stack([masked_mse(a, b, mask, check) for a, b in zip(mine, target)]).mean()
    loss = config.alpha_task * parts["task"] + config.alpha_kl * parts["kl"]
    if "mse" in parts:
        loss = loss + config.alpha_mse * parts["mse"]
    return loss, {k: v.detach() for k, v in parts.items()}
