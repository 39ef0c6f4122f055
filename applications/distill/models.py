"""Loading teachers and students (local directory or hub id) and telling masked from causal LMs."""

from __future__ import annotations

import transformers as tf
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .errors import DistillConfigError

_CAUSAL_CLASSES = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_causal_lm(model_or_config) -> bool:
    """True for causal LMs (GPT-2, Llama, Qwen2, ...), False for masked LMs (BERT, RoBERTa, DistilBERT)."""
    if isinstance(model_or_config, nn.Module):
        return type(model_or_config).__name__ in _CAUSAL_CLASSES
    names = getattr(model_or_config, "architectures", None) or []
    if names:
        return any(n in _CAUSAL_CLASSES or n.endswith("ForCausalLM") for n in names)
    return model_or_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_or_config.model_type not in (
        "bert", "roberta", "distilbert")


def load_config(path: str):
    """A model's config (no weights), from a save_pretrained directory or a hub id."""
    try:
        return tf.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DistillConfigError(f"cannot load a model config from {path!r}: {e}") from e


def load_lm(path: str) -> nn.Module:
    """A masked or causal LM with its head, from a save_pretrained directory or a hub id."""
    config = load_config(path)
    auto = tf.AutoModelForCausalLM if is_causal_lm(config) else tf.AutoModelForMaskedLM
    return auto.from_pretrained(path)


def load_tokenizer(path: str):
    """The tokenizer saved with a model, or None when there is none."""
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if len(tok) <= len(set(tok.all_special_ids)):  # a directory without tokenizer files can yield an empty one
        return None
    return tok


def ensure_pad(tokenizer):
    """Causal tokenizers often lack a pad token: pad with EOS (padding is masked out everywhere)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DistillConfigError("the tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def max_tokens(model_or_config, wanted: int) -> int:
    """`wanted`, capped at the positions the model can embed (RoBERTa's offset of 2 included)."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is None:
        return wanted
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2
    return min(wanted, limit)


def enable_cache(model: nn.Module) -> None:
    """A saved model generates with its KV cache (training turns `use_cache` off in some configs)."""
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "use_cache"):
        generation.use_cache = True
