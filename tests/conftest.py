"""Shared tiny-model fixtures: seeded, randomised (so sites differ visibly), eval mode, no dropout.

`build(family, dtype)` makes a fresh model; the `gpt2` / `llama` / `tiny` fixtures are float64 copies
shared per module (interventions never change weights). `hook_ids(model)` lists every installed hook.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models only, never the network

import pytest
import torch
import transformers as tf

tf.logging.set_verbosity_error()
torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and contend under pytest -n 2)

VOCAB = 40

CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(
        n_layer=2, n_embd=16, n_head=4, n_inner=24, vocab_size=VOCAB, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    ),
    # grouped-query attention (2 key/value heads for 4 query heads) and rotary embeddings
    "llama": lambda: tf.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, vocab_size=VOCAB, max_position_embeddings=32, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (norm gains near 1) so that no site is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if p.dim() >= 2:
                p.copy_(0.3 * noise)
            elif name.endswith("weight"):  # LayerNorm / RMSNorm gains
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def build(family: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny causal LM of `family` ('gpt2' or 'llama'), randomised, in eval mode."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[family]())
    model.config.use_cache = False  # no key/value cache: one less object per forward
    return randomise(model, seed).to(dtype).eval()


def tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Seeded random token ids [batch, seq]."""
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hook_ids(model: torch.nn.Module) -> set[tuple[str, str, int]]:
    """Every (module name, hook kind, hook id) installed on `model`'s modules."""
    from torch.nn.modules import module as torch_module

    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    found = {
        (name, kind, hid)
        for name, mod in model.named_modules()
        for kind in kinds
        for hid in getattr(mod, kind, {})
    }
    for kind in kinds:  # torch's global (all-module) hooks too
        found |= {("<global>", kind, hid) for hid in getattr(torch_module, "_global" + kind, {})}
    return found


@pytest.fixture(scope="module")
def gpt2():
    return build("gpt2")


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    """Each of the two oracle families in turn (float64)."""
    return build(request.param)


def save_bert_teacher(folder, texts: list[str], vocab: int, *, layers: int = 4, hidden: int = 16,
                      intermediate: int = 24, **config) -> tf.BertForMaskedLM:
    """A tiny BERT masked-LM teacher (seed 0) with a WordPiece tokenizer trained on `texts`, both saved to
    `folder` as save_pretrained does: the distillation tests' common starting point."""
    from applications.distill.data import train_tokenizer

    tok = train_tokenizer(texts, vocab, causal=False)
    torch.manual_seed(0)
    teacher = tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=intermediate, max_position_embeddings=64, pad_token_id=tok.pad_token_id, **config))
    teacher.save_pretrained(folder)
    tok.save_pretrained(folder)
    return teacher


def run_study_twice(main, argv: list[str], work) -> tuple[dict, dict, dict]:
    """A study's `main(argv)`, then the same command again on the same cache `work`: (first result, second
    result, the result.json files' modification times after the first), to check that nothing reruns."""
    from pathlib import Path

    first = main(argv, log=lambda *_: None)
    stamps = {p: os.path.getmtime(p) for p in Path(work).rglob("result.json")}
    second = main(argv, log=lambda *_: None)
    return first, second, stamps
