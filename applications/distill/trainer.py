"""`DistillTrainer`: the one `transformers.Trainer` every method trains on; a method is a `Method`.

The Trainer supplies device placement, gradient accumulation, AdamW with its schedule
(`get_scheduler`), gradient clipping, DDP under torchrun, bf16/fp16, checkpoints with exact resume,
periodic evaluation, the progress bar and TensorBoard. A `Method` supplies only what differs:
its frozen models (the teacher, TED's teacher filters: on the student's device, in eval mode,
without gradients, optionally in `teacher_dtype`; or placed by `place_frozen`: sharded or offloaded), the modules it trains beside the model (a cosine
projection, TED's student filters: optimised, clipped, synchronised across processes, checkpointed)
and `losses(model, inputs, step)` — a dict of 0-d tensors with the weighted sum under "loss".

Device discipline: losses are accumulated on the device; the one host read per optimizer step is
the non-finite check (which replaces the Trainer's own `logging_nan_inf_filter` check), plus the
reads at logging steps.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .errors import NonFiniteLossError

METHOD_FILE = "method_modules.pt"
#: The masking / span stream of evaluation (training uses the optimizer step).
EVAL_STEP = -1


class Method(nn.Module):
    """What one training method adds to the Trainer; subclasses set up their modules in __init__."""

    def frozen(self) -> list[nn.Module]:
        """Modules that only run forward (teachers, TED's teacher filters)."""
        return []

    def trainable(self) -> dict[str, nn.Module]:
        """Modules trained beside the Trainer's model (name -> module); saved in every checkpoint."""
        return {}

    def losses(self, model: nn.Module, inputs: dict, step: int) -> dict[str, torch.Tensor]:
        """0-d loss tensors of one batch; "loss" is the weighted sum that is optimised."""
        raise NotImplementedError


class DistillTrainer(Trainer):
    """Trainer(model=student, args, train_dataset, data_collator, ..., method=Method)."""

    def __init__(self, *args, method: Method, teacher_dtype: torch.dtype | None = None, warmup_ratio: float = 0.0,
                 place_frozen=None, **kwargs):
        kwargs.setdefault("callbacks", [])
        kwargs["callbacks"] = [*kwargs["callbacks"], _FiniteGuard(self)]
        super().__init__(*args, **kwargs)
        self.warmup_ratio = warmup_ratio
        self.args.logging_nan_inf_filter = False  # one non-finite check per step: ours (it stops, not skips)
        for module in method.frozen():
            module.eval().requires_grad_(False)
            if teacher_dtype is not None:
                module.to(teacher_dtype)
        # place_frozen(module, trainer) -> True when it placed the module itself (sharded, offloaded: fsdp.py)
        placed = [m for m in method.frozen() if place_frozen is not None and place_frozen(m, self)]
        self.method = _to_device(method, self.args.device, keep=placed)
        self.extra_params = [p for m in method.trainable().values() for p in m.parameters()]
        self.loss_is_scaled_for_ga = False  # our losses are means: let the Trainer divide by the accumulation
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._eval_sums: dict[str, torch.Tensor] = {}
        self._eval_count = 0
        self._finite: torch.Tensor | None = None
        self._last: dict[str, torch.Tensor] = {}
        self._extras_synced = False

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Linear warmup over ceil(warmup_ratio * steps) steps: computed here, as a step count, because
        TrainingArguments' `warmup_steps` < 1 is a ratio in transformers 5.x but a step count (0) in 4.x."""
        if self.lr_scheduler is None:
            self.args.warmup_steps = math.ceil(self.warmup_ratio * num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    # -- the loss -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        for m in self.method.trainable().values():
            m.train(training)
        losses = self.method.losses(model, inputs, self.state.global_step if training else EVAL_STEP)
        loss = losses["loss"]
        detached = {k: v.detach() for k, v in losses.items()}
        sums = self._sums if training else self._eval_sums
        for k, v in detached.items():
            sums[k] = sums[k] + v if k in sums else v.clone()
        if training:
            self._count += 1
            finite = torch.isfinite(loss.detach())
            self._finite = finite if self._finite is None else self._finite & finite
            self._last = detached
        else:
            self._eval_count += 1
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def check_finite(self) -> None:
        """The step's one host read: stop before a non-finite loss's update reaches the weights."""
        if self._finite is None:
            return
        finite, self._finite = self._finite, None
        if bool(finite):
            return
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in self._last.items())
        out = self.args.output_dir
        last = get_last_checkpoint(out) if out and os.path.isdir(out) else None
        raise NonFiniteLossError(
            f"non-finite loss at step {self.state.global_step} ({shown}); training stopped before this "
            f"update reached the weights. Last good checkpoint: {last or 'none saved yet'}. Lower the "
            "learning rate or check the data (a batch where no position is counted gives 0/0), then "
            "resume from that checkpoint."
        )

    def log(self, logs, start_time=None):
        if "loss" in logs and self._count:
            logs.update({f"loss_{k}": round(float(v) / self._count, 6) for k, v in self._sums.items() if k != "loss"})
            self._sums, self._count = {}, 0
        if "eval_loss" in logs and self._eval_count:
            logs.update({f"eval_loss_{k}": round(float(v) / self._eval_count, 6)
                         for k, v in self._eval_sums.items() if k != "loss"})
            self._eval_sums, self._eval_count = {}, 0
        super().log(logs, start_time)

    # -- the method's own trained modules ----------------------------------------------------------
    def create_optimizer(self, *args, **kwargs):  # 5.x before 5.N: no `model` argument
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.extra_params and not getattr(self, "_extras_added", False):
            optimizer.add_param_group({"params": self.extra_params, "weight_decay": 0.0})
            self._extras_added = True
        return optimizer

    def sync_extra_grads(self) -> None:
        """Average the extra modules' gradients across processes (DDP covers only the model's)."""
        if self._extras_synced or not self.extra_params:
            return
        self._extras_synced = True
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.extra_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)

    def _clip_grad_norm(self, model):
        self.sync_extra_grads()
        if not self.extra_params:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *self.extra_params], self.args.max_grad_norm)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.method.trainable() and self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            torch.save({k: m.state_dict() for k, m in self.method.trainable().items()}, folder / METHOD_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / METHOD_FILE
        if self.method.trainable() and path.is_file():
            saved = torch.load(path, map_location=self.args.device, weights_only=True)
            for k, m in self.method.trainable().items():
                m.load_state_dict(saved[k])


def _to_device(method: Method, device, keep: list[nn.Module]) -> Method:
    """`method.to(device)`, leaving the `keep` children where they were placed (a sharded or offloaded teacher)."""
    kept = {name: m for name, m in method._modules.items() if any(m is k for k in keep)}
    for name in kept:
        del method._modules[name]
    try:
        method.to(device)
    finally:
        method._modules.update(kept)
    return method


class _FiniteGuard(TrainerCallback):
    """Runs the trainer's one check per optimizer step, after accumulation and before the update; clears
    the extra modules' gradients after it (the Trainer zeroes only its model's)."""

    def __init__(self, trainer: DistillTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.sync_extra_grads()
        self.trainer._extras_synced = False
        self.trainer.check_finite()

    def on_optimizer_step(self, args, state, control, **kwargs):
        for p in self.trainer.extra_params:
            p.grad = None


class CSVLogCallback(TrainerCallback):
    """Appends every logged value to ``<output_dir>/log.csv`` as (step, key, value) rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        """On a resume, drop the rows logged after the checkpoint: those steps are about to run again."""
        if not state.is_world_process_zero or not self.path.is_file():
            return
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= state.global_step]
        if len(kept) != len(rows):
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerows(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "key", "value"])
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    writer.writerow([state.global_step, k, v])
