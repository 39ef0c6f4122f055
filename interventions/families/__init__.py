"""Model families: one declarative table each. Adding a family = adding a table here (and an oracle test)."""

from __future__ import annotations

from .base import Family
from .bert import BERT
from .distilbert import DISTILBERT
from .gpt2 import GPT2
from .gpt_neox import GPT_NEOX
from .llama import LLAMA
from .opt import OPT
from .qwen2 import QWEN2

FAMILIES: tuple[Family, ...] = (GPT2, LLAMA, QWEN2, GPT_NEOX, OPT, BERT, DISTILBERT)


def family_for(model_type: str | None) -> Family | None:
    """The family table for a Hugging Face ``config.model_type``, or None."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


__all__ = ["Family", "FAMILIES", "family_for"]
