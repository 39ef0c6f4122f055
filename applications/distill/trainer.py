"""`DistillTrainer`: a Hugging Face `Trainer` whose loss is the weighted sum of the distillation objectives.

The Trainer supplies gradient accumulation, AdamW with the linear warmup/decay schedule, gradient
clipping, DDP under torchrun, checkpoints with exact resume, the progress bar and TensorBoard.
This class only turns each batch into losses (batching.prepare + step.distill_losses), logs each
component, writes a CSV log, and stops on a NaN/inf loss before it reaches the weights.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .batching import BatchRecipe, prepare
from .errors import NonFiniteLossError
from .step import Objectives, distill_losses

PROJECTION_FILE = "cos_projection.pt"


class DistillTrainer(Trainer):
    """Trainer(model=student, ...) plus the frozen teacher and the objectives."""

    def __init__(self, *args, teacher: nn.Module | None, objectives: Objectives, recipe: BatchRecipe,
                 projection: nn.Module | None = None, warmup_ratio: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.warmup_ratio = warmup_ratio
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False) if teacher is not None else None
        self.objectives = objectives
        self.recipe = recipe
        self.projection = projection.to(self.args.device) if projection is not None else None
        self.loss_is_scaled_for_ga = False  # our losses are means: let the Trainer divide by the accumulation
        self._sums: dict[str, float] = {}
        self._count = 0

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Linear warmup over ceil(warmup_ratio * steps) steps: computed here, as a step count, because
        TrainingArguments' `warmup_steps` < 1 is a ratio in transformers 5.x but a step count (0) in 4.x."""
        if self.lr_scheduler is None:
            self.args.warmup_steps = math.ceil(self.warmup_ratio * num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    # -- the loss -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from .evaluate import EVAL_SEED, EVAL_STEP

        # evaluation draws its masks and spans from the fixed evaluation seed, never the training seed
        step, recipe = (self.state.global_step, self.recipe) if model.training else \
            (EVAL_STEP, replace(self.recipe, seed=EVAL_SEED))
        prepared = prepare({k: v.cpu() for k, v in inputs.items()}, step, recipe)
        device = inputs["input_ids"].device
        batch = {k: v.to(device) for k, v in prepared.inputs.items()}
        student = self.accelerator.unwrap_model(model)
        losses = distill_losses(student, self.teacher, batch, prepared.labels.to(device), self.objectives,
                                prepared.plan, prepared.pair, self.projection, student_call=model)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise NonFiniteLossError(
                f"non-finite loss at step {self.state.global_step} ({shown}); training stopped before this "
                f"update reached the weights. Last good checkpoint: {last or 'none saved yet'}. Lower the "
                "learning rate or check the data, then resume from that checkpoint."
            )
        if model.training:
            for k, v in losses.items():
                self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
            self._count += 1
        return (loss, None) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._count:
            logs.update({f"loss_{k}": round(v / self._count, 6) for k, v in self._sums.items() if k != "loss"})
            self._sums, self._count = {}, 0
        super().log(logs, start_time)

    # -- the optional cosine projection lives outside the student ---------------------------------
    def create_optimizer(self, *args, **kwargs):  # 5.x before 5.N: no `model` argument
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.projection is not None and not getattr(self, "_projection_added", False):
            optimizer.add_param_group({"params": list(self.projection.parameters()), "weight_decay": 0.0})
            self._projection_added = True
        return optimizer

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.projection is not None and self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            torch.save(self.projection.state_dict(), folder / PROJECTION_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / PROJECTION_FILE
        if self.projection is not None and path.is_file():
            self.projection.load_state_dict(torch.load(path, map_location=self.args.device))


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
