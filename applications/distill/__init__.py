"""Distillation of Hugging Face language models: causal distillation (DIITO), standard KD, ATKD and TED.

Library pieces, one concept each: config (options), data (reading, tokenizing, batching), masking
(MLM masking), pairing (sources and spans), objectives (pure losses), atkd (ATKD's TKD/DKD split),
ted (TED's filters and stage losses), ted_train / ted_cli (TED's stages), sst (SST-2-style tsv),
student (building students), step (one step's losses with the cached counterfactual pass), trainer
(HF Trainer), evaluate (perplexity, IIA), demo (the embedded demo).
CLI: ``python -m applications.distill --help``.
"""

from .config import DistillConfig, objective_weights
from .errors import DataError, DistillConfigError, IncompatibleModelsError, NonFiniteLossError, SpanError
from .step import Objectives, aligned_pairs, distill_losses

__all__ = [
    "DataError", "DistillConfig", "DistillConfigError", "IncompatibleModelsError", "NonFiniteLossError",
    "Objectives", "SpanError", "aligned_pairs", "distill_losses", "objective_weights",
]
