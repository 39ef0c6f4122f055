"""Distillation of Hugging Face language models: causal distillation (DIITO), standard KD, ATKD and TED.

Every method is a `trainer.Method` on the one `trainer.DistillTrainer` (a transformers.Trainer).
Where things are: cli (commands), config (options), run (train / pretrain), data (reading,
tokenizing, the collator), models / student, trainer (the one trainer), methods (KD, DIITO, ATKD as
one Method), batching / masking / seeding (a batch's draws on its device), objectives/ (kd, atkd,
ted: pure losses), diito/ (pairing, step: the counterfactual pass), ted/ (stages, cli), evaluate
(perplexity, IIA), output_dir, plot, demo. CLI: ``python -m applications.distill --help``.
"""

from .config import DistillConfig, objective_weights
from .diito.step import Objectives, aligned_pairs, distill_losses
from .errors import DataError, DistillConfigError, IncompatibleModelsError, NonFiniteLossError, SpanError

__all__ = [
    "DataError", "DistillConfig", "DistillConfigError", "IncompatibleModelsError", "NonFiniteLossError",
    "Objectives", "SpanError", "aligned_pairs", "distill_losses", "objective_weights",
]
