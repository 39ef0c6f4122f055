"""The language-model distillation method (KD, DIITO and its variants, ATKD, plain MLM/CLM pretraining)
as a `trainer.Method`: the batch is masked and paired on its device (batching.prepare), then
step.distill_losses computes the weighted objectives.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .batching import BatchRecipe, prepare
from .diito.step import Objectives, distill_losses
from .evaluate import EVAL_SEED
from .trainer import EVAL_STEP, Method


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (the model itself otherwise)."""
    return getattr(model, "module", model)


class LMDistillation(Method):
    """The frozen teacher (None: plain LM training), the objectives, the batch recipe, an optional projection."""

    def __init__(self, teacher: nn.Module | None, objectives: Objectives, recipe: BatchRecipe,
                 projection: nn.Module | None = None):
        super().__init__()
        self.teacher, self.projection = teacher, projection
        self.objectives, self.recipe = objectives, recipe
        self._recipes: dict[torch.device, BatchRecipe] = {}

    def frozen(self) -> list[nn.Module]:
        return [self.teacher] if self.teacher is not None else []

    def trainable(self) -> dict[str, nn.Module]:
        return {"projection": self.projection} if self.projection is not None else {}

    def _recipe_on(self, device: torch.device, evaluation: bool) -> BatchRecipe:
        """The recipe with its masking weights on `device` (moved once, not every step); evaluation draws
        its masks and spans from the fixed evaluation seed, never the training seed."""
        if (device, evaluation) not in self._recipes:
            w = self.recipe.token_weights
            recipe = replace(self.recipe, token_weights=None if w is None else w.to(device))
            self._recipes[device, evaluation] = replace(recipe, seed=EVAL_SEED) if evaluation else recipe
        return self._recipes[device, evaluation]

    def losses(self, model, inputs, step):
        p = prepare(inputs, step, self._recipe_on(inputs["input_ids"].device, step == EVAL_STEP))
        return distill_losses(unwrap(model), self.teacher, p.inputs, p.labels, self.objectives, p.plan, p.pair,
                              self.projection, student_call=model)
