"""Model families: one declarative table each. Adding a family = adding a table here (and an oracle test).

Architectures whose blocks use the common child names need no table: `layout.resolve` infers their
parts. `INFERRED` lists the model types whose inferred layout tests/test_architectures.py verifies;
any other model type with a recognisable structure is inferred too, with a warning.
"""

from __future__ import annotations

from .base import Family
from .bert import BERT
from .bloom import BLOOM
from .distilbert import DISTILBERT
from .falcon import FALCON
from .gpt2 import GPT2
from .gpt_neox import GPT_NEOX
from .granite import GRANITE
from .layout import LayerLayout, resolve
from .llama import LLAMA
from .mpt import MPT
from .opt import OPT
from .qwen2 import QWEN2
from .stablelm import STABLELM

FAMILIES: tuple[Family, ...] = (GPT2, LLAMA, QWEN2, GPT_NEOX, OPT, BERT, DISTILBERT, BLOOM, FALCON, MPT, GRANITE,
                                STABLELM)

INFERRED: tuple[str, ...] = (
    "gptj", "gpt_neo", "codegen", "gpt_bigcode", "xglm", "biogpt", "ministral", "qwen3", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "starcoder2", "olmo", "olmo2", "cohere", "cohere2", "persimmon", "helium",
    "smollm3", "glm", "glm4", "internlm3", "exaone4", "nemotron", "seed_oss", "arcee", "apertus", "mixtral",
    "qwen2_moe", "qwen3_moe", "olmoe", "phimoe",
)


def family_for(model_type: str | None) -> Family | None:
    """The family table for a Hugging Face ``config.model_type``, or None."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


__all__ = ["Family", "FAMILIES", "INFERRED", "LayerLayout", "family_for", "resolve"]
