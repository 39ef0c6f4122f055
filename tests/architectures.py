"""Tiny offline configs of the 45 causal-LM model types of issue 12, and `build_tiny` to make one.

Every size is shrunk (2 layers, hidden 32, 4 heads of 8, vocab 64, 64 positions) and each config
exercises what changes a site's definition where the architecture has it: grouped-query (2 KV
heads) and multi-query attention, partial rotary, a sliding window of 4 (shorter than the tests'
sequences of 7), soft-capping, Granite's multipliers, q/k norms, post-sublayer norms, a dense layer
next to an MoE layer. `VARIANTS` adds config-dependent layouts (parallel vs sequential residual,
Falcon's new decoder architecture) under names ``type:variant``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers as tf
from conftest import randomise

VOCAB = 64
SEQ = 7  # the tests' sequence length: longer than WINDOW
WINDOW = 4
HIDDEN, HEADS, HEAD_DIM, KV_HEADS, FFN = 32, 4, 8, 2, 48

COMMON = dict(
    hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FFN,
    vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    use_cache=False, tie_word_embeddings=False,
)
GQA = dict(num_key_value_heads=KV_HEADS)
HD = dict(head_dim=HEAD_DIM)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# model_type -> overrides on COMMON (every model type of the issue, in its order)
CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_inner=FFN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": dict(use_parallel_residual=True, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0),
    "gptj": dict(rotary_dim=4, n_inner=FFN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # alternating global / local attention, the local window shorter than the sequence
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=WINDOW, resid_dropout=0.0,
                    embed_dropout=0.0, attention_dropout=0.0),
    "opt": dict(ffn_dim=FFN, word_embed_proj_dim=HIDDEN, dropout=0.0, attention_dropout=0.0),
    "bloom": dict(),
    "falcon": dict(ffn_hidden_size=FFN, multi_query=True, parallel_attn=True),  # MQA, parallel residual
    "codegen": dict(n_ctx=64, rotary_dim=4, n_inner=FFN),
    "gpt_bigcode": dict(n_inner=FFN, multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),  # MQA
    "mpt": dict(max_seq_len=64, expansion_ratio=2),
    "xglm": dict(ffn_dim=FFN, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    "biogpt": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "llama": dict(**GQA),
    "mistral": dict(**GQA, sliding_window=WINDOW),
    "ministral": dict(**GQA, **HD, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "qwen2": dict(**GQA),
    "qwen3": dict(**GQA, **HD),
    "gemma": dict(**GQA, **HD),
    "gemma2": dict(**GQA, **HD, query_pre_attn_scalar=6, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(**GQA, **HD, query_pre_attn_scalar=6, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi": dict(partial_rotary_factor=0.5, qk_layernorm=True, resid_pdrop=0.0, embd_pdrop=0.0),
    "phi3": dict(**GQA, original_max_position_embeddings=64),
    "stablelm": dict(**GQA, partial_rotary_factor=0.25, qk_layernorm=True, use_parallel_residual=False),
    "starcoder2": dict(**GQA, sliding_window=WINDOW, residual_dropout=0.0, embedding_dropout=0.0),
    "olmo": dict(),
    "olmo2": dict(**GQA),
    "cohere": dict(**GQA, use_qk_norm=True, logit_scale=0.5),
    "cohere2": dict(**GQA, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "granite": dict(**GQA, residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.3,
                    logits_scaling=4.0),
    "persimmon": dict(partial_rotary_factor=0.5, qk_layernorm=True),
    "helium": dict(**GQA, **HD),
    "smollm3": dict(**GQA, no_rope_layers=[1, 0]),
    "glm": dict(**GQA, **HD, partial_rotary_factor=0.5),
    "glm4": dict(**GQA, **HD, partial_rotary_factor=0.5),
    "internlm3": dict(**GQA, **HD),
    "exaone4": dict(**GQA, **HD, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "nemotron": dict(**GQA, partial_rotary_factor=0.5),
    "seed_oss": dict(**GQA, **HD),
    "arcee": dict(**GQA),
    "apertus": dict(**GQA),
    "mixtral": dict(**GQA, **MOE),
    "qwen2_moe": dict(**GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=FFN, mlp_only_layers=[0]),  # layer 0 dense, 1 MoE
    "qwen3_moe": dict(**GQA, **HD, **MOE, moe_intermediate_size=24),
    "olmoe": dict(**GQA, num_experts=4, num_experts_per_tok=2),
    "phimoe": dict(**GQA, **MOE),
}
MODEL_TYPES: tuple[str, ...] = tuple(CONFIGS)

# config-dependent layouts, tested next to the defaults: name -> (model_type, extra overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "gpt_neox:sequential": ("gpt_neox", dict(use_parallel_residual=False)),
    "stablelm:parallel": ("stablelm", dict(use_parallel_residual=True)),
    "falcon:sequential": ("falcon", dict(parallel_attn=False, multi_query=False)),
    "falcon:new_arch": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=KV_HEADS)),
}
NAMES: tuple[str, ...] = MODEL_TYPES + tuple(VARIANTS)

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe")
# XGLM's eager attention clamps with torch.full((), finfo(float64).min) in the default float32: it cannot
# run in float64 (transformers 5.24), so it is built in float32.
FLOAT32_ONLY = ("xglm",)


def config_for(name: str) -> tf.PretrainedConfig:
    """The tiny config of a model type (or a ``type:variant`` of `VARIANTS`)."""
    model_type, extra = VARIANTS.get(name, (name, {}))
    config = tf.AutoConfig.for_model(model_type, **{**COMMON, **CONFIGS[model_type], **extra})
    if model_type in MOE_TYPES:
        config._experts_implementation = "eager"  # grouped_mm does not run in float64
    return config


def build_tiny(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny causal LM of `name` (a model type or variant), randomised, in eval mode."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config_for(name))
    if name in FLOAT32_ONLY and dtype == torch.float64:
        dtype = torch.float32
    return randomise(model, seed).to(dtype).eval()


def tolerance(model: torch.nn.Module) -> dict:
    """assert_close bounds for a tiny model: tight in float64, looser for the float32-only ones."""
    if next(model.parameters()).dtype == torch.float64:
        return {"rtol": 1e-5, "atol": 1e-6}
    return {"rtol": 1e-4, "atol": 1e-5}


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids [batch, seq] (ids >= 3: no pad / bos / eos)."""
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
