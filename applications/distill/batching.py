"""From a padded batch to what one step needs: masked inputs and labels, the source pairing, the spans,
and the aligned layer pair, every draw keyed by (seed, step, example index) — see seeding.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import seeding
from .diito.pairing import InterchangePlan, draw_plan, source_order
from .masking import clm_labels, mlm_mask

MASK, SPAN, PERM, PAIR = 1, 2, 3, 4  # independent random streams


@dataclass(frozen=True)
class BatchRecipe:
    """How to turn raw batches into training inputs (fixed for a run)."""

    causal: bool
    seed: int
    pairs: tuple  # ((student layer, (teacher layers...)), ...); empty without DIITO
    token_weights: torch.Tensor | None = None  # per vocabulary id, for MLM masking
    mask_token_id: int | None = None
    vocab_size: int | None = None
    mlm_probability: float = 0.15
    mask_split: tuple = (0.8, 0.1, 0.1)
    span_mode: str = "consecutive"
    span_fraction: float = 0.3


@dataclass(frozen=True)
class Prepared:
    inputs: dict
    labels: torch.Tensor
    plan: InterchangePlan | None
    pair: tuple | None


def _keys(seed: int, step: int, idx, stream: int) -> list[int]:
    return [seeding.key(seed, step, int(i), stream) for i in idx]


def prepare(batch: dict, step: int, recipe: BatchRecipe) -> Prepared:
    """Mask (MLM) or label (CLM) the batch and draw its interchange plan for optimizer step `step`.

    `batch` holds input_ids / attention_mask on the model's device and, from the collator, `idx` and
    `lengths` as lists: every draw is keyed by them, so nothing is read back from the device and every
    tensor is made on the batch's device.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    idx = batch["idx"] if isinstance(batch["idx"], list) else batch["idx"].tolist()
    lengths = batch.get("lengths")
    if recipe.causal:
        inputs = {"input_ids": ids, "attention_mask": attn}
        labels = clm_labels(ids, attn)
    else:
        masked = mlm_mask(ids, attn, recipe.token_weights, recipe.mask_token_id, recipe.vocab_size,
                          _keys(recipe.seed, step, idx, MASK), recipe.mlm_probability, recipe.mask_split, lengths)
        inputs = {"input_ids": masked.input_ids, "attention_mask": attn}
        labels = masked.labels
    plan = pair = None
    if recipe.pairs:
        pair = recipe.pairs[seeding.rng(seeding.key(recipe.seed, step, PAIR)).randrange(len(recipe.pairs))]
        perm = source_order(len(idx), seeding.key(recipe.seed, step, PERM, *idx))
        plan = draw_plan(attn, _keys(recipe.seed, step, idx, SPAN), perm, recipe.span_mode,
                         recipe.span_fraction, None if recipe.causal else labels, lengths)
    return Prepared(inputs, labels, plan, pair)
