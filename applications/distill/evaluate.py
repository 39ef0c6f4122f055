"""Held-out perplexity (MLM or CLM as fits the model) and student–teacher IIA.

IIA here: under the same interchange (same bases, sources and spans; student layer i swapped in the
student, its aligned teacher layers in the teacher), the share of base non-pad tokens whose top-1
prediction agrees between student and teacher, over every aligned pair of the alignment.
MLM perplexity masks the eval data deterministically (15%, 80/10/10, uniform over non-special tokens).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from interventions import record_blocks

from .batching import BatchRecipe, prepare
from .data import Collator, TokenizedTexts
from .diito.step import aligned_pairs, counterfactual
from .errors import DataError
from .models import is_causal_lm, max_tokens
from .objectives import nll_sum, top1_agreement
from .student import num_layers

EVAL_STEP = -1  # the masking/span stream reserved for evaluation
#: The seed of every evaluation's masks, sources and spans, whatever the training seed: students trained
#: with different seeds are scored on the same masks, and `summary.json` equals a later `eval`.
EVAL_SEED = 0


def _batches(dataset, tokenizer, batch_size, device):
    """Padded batches with their tensors on the model's `device` (idx and lengths stay lists)."""
    collate = Collator(tokenizer.pad_token_id)
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _recipe(model, tokenizer, seed, pairs=(), span_fraction=0.3) -> BatchRecipe:
    vocab = model.get_output_embeddings().weight.shape[0]
    weights = torch.ones(vocab, dtype=torch.float64)
    weights[list(tokenizer.all_special_ids)] = 0.0
    return BatchRecipe(causal=is_causal_lm(model), seed=seed, pairs=tuple(pairs), token_weights=weights,
                       mask_token_id=tokenizer.mask_token_id, vocab_size=vocab, span_fraction=span_fraction)


@torch.no_grad()
def perplexity(model, dataset, tokenizer, seed: int = EVAL_SEED, batch_size: int = 16) -> float:
    """exp(mean cross-entropy): next-token for causal LMs, masked positions for masked LMs."""
    model.eval()
    device = _device(model)
    recipe = _recipe(model, tokenizer, seed)
    recipe = replace(recipe, token_weights=recipe.token_weights.to(device))
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for batch in _batches(dataset, tokenizer, batch_size, device):
        p = prepare(batch, EVAL_STEP, recipe)
        nll, n = nll_sum(model(**p.inputs).logits, p.labels, recipe.causal)
        total, count = total + nll.double(), count + n
    return math.exp(float(total) / max(int(count), 1))  # the one host read


@torch.no_grad()
def iia(student, teacher, dataset, tokenizer, alignment="full", seed: int = EVAL_SEED, batch_size: int = 16,
        span_fraction: float = 0.3) -> dict:
    """Student-vs-teacher interchange intervention accuracy, overall and per aligned pair."""
    student.eval()
    teacher.eval()
    pairs = aligned_pairs(alignment, num_layers(student), num_layers(teacher))
    recipe = _recipe(teacher, tokenizer, seed, pairs[:1], span_fraction)
    per_pair = {}
    for s_layer, t_layers in pairs:
        agree = counted = 0
        for batch in _batches(dataset, tokenizer, batch_size, _device(student)):
            if len(batch["idx"]) < 2:
                continue
            p = prepare(batch, EVAL_STEP, recipe)
            with record_blocks(teacher) as t_rec:
                teacher(**p.inputs)
            with record_blocks(student) as s_rec:
                student(**p.inputs)
            t_out, _ = counterfactual(teacher, p.inputs, t_rec, t_layers, p.plan)
            s_out, _ = counterfactual(student, p.inputs, s_rec, (s_layer,), p.plan)
            a, c = top1_agreement(s_out.logits, t_out.logits, p.inputs["attention_mask"])
            agree, counted = agree + a, counted + c
        per_pair[f"{s_layer}->{list(t_layers)}"] = (agree, counted)
    total_a = sum(a for a, _ in per_pair.values())
    total_c = sum(c for _, c in per_pair.values())
    return {"iia": total_a / max(total_c, 1),
            "iia_per_pair": {k: a / max(c, 1) for k, (a, c) in per_pair.items()}}


def evaluate(model, texts: Sequence[str], tokenizer, teacher=None, alignment="full", max_length: int = 128,
             seed: int = EVAL_SEED, batch_size: int = 16, span_fraction: float = 0.3) -> dict:
    """{'perplexity', and with a teacher 'teacher_perplexity', 'iia', 'iia_per_pair'}."""
    need = math.ceil(1 / span_fraction) if teacher is not None else 1
    max_length = max_tokens(model, max_length) if teacher is None else min(max_tokens(model, max_length),
                                                                           max_tokens(teacher, max_length))
    dataset = TokenizedTexts(texts, tokenizer, max_length, need, source="eval data",
                             why="an interchange span needs that many" if teacher is not None else "too short")
    if dataset.dropped or dataset.truncated:
        logging.getLogger("applications.distill").warning(dataset.report())
    if teacher is not None and len(dataset) < 2:
        raise DataError(f"IIA swaps spans between examples of a batch: the eval data needs >= 2 examples of "
                        f">= {need} tokens, got {len(dataset)}")
    out = {"perplexity": perplexity(model, dataset, tokenizer, seed, batch_size), "examples": len(dataset),
           "settings": {"eval_seed": seed, "max_length": max_length, "batch_size": batch_size}}  # to reproduce it
    if teacher is not None:
        out["teacher_perplexity"] = perplexity(teacher, dataset, tokenizer, seed, batch_size)
        out.update(iia(model, teacher, dataset, tokenizer, alignment, seed, batch_size, span_fraction))
        out["alignment"] = alignment if isinstance(alignment, str) else repr(alignment)
        out["settings"]["span_fraction"] = span_fraction
    return out
