"""One distillation step's losses: the standard pass, and DIITO's counterfactual pass reusing it.

Standard pass: teacher (no grad) and student run once on the batch while every block's output is
recorded. Counterfactual pass (only when a DIITO objective is on): source values are read from that
recording (the source of example i is example perm[i] of the same batch), blocks up to the lowest
intervened layer replay their recorded outputs (`interventions.replay_blocks`), the span is swapped
at each aligned ``layers.{j}.output`` (`set_value`), and only the blocks above recompute. Per step:
2 forwards of the lower parts are saved in each model and no source pass runs at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from interventions import Alignment, AlignmentError, alignments, record_blocks, replay_blocks, set_value

from ..errors import DistillConfigError
from ..objectives import kd as obj
from ..objectives.atkd import ATKDConfig, atkd_objective
from .pairing import InterchangePlan

_LAYER = re.compile(r"layers\.(\d+)\.output")


def _layer_of(site, who: str, n: int) -> int:
    name = getattr(site, "name", site)
    m = _LAYER.fullmatch(str(name))
    if m is None or getattr(site, "is_whole", True) is False:
        raise AlignmentError(
            f"DIITO swaps whole block outputs; {who} site {site!r} is not of the form 'layers.{{i}}.output'"
        )
    i = int(m.group(1))
    if not 0 <= i < n:
        raise AlignmentError(f"{who} layer {i} (site {name!r}) out of range: the {who} has {n} layers (valid 0..{n - 1})")
    return i


def aligned_pairs(alignment, n_student: int, n_teacher: int) -> list[tuple[int, tuple[int, ...]]]:
    """(student layer, teacher layers) pairs of an alignment name ('full', 'middle', 'late') or Alignment."""
    if isinstance(alignment, str):
        makers = {"full": alignments.full, "middle": alignments.middle, "late": alignments.late}
        if alignment not in makers:
            raise AlignmentError(f"unknown alignment {alignment!r}; valid: full, middle, late (or an Alignment)")
        alignment = makers[alignment](n_student, n_teacher)
    if not isinstance(alignment, Alignment):
        alignment = Alignment(alignment)
    if not len(alignment):
        raise AlignmentError("the alignment is empty: DIITO needs at least one (student layer -> teacher layers) pair")
    pairs = []
    for key in sorted(alignment.domain, key=lambda k: _layer_of(k, "student", n_student)):
        s = _layer_of(key, "student", n_student)
        t = tuple(sorted(_layer_of(site, "teacher", n_teacher) for site in alignment[key]))
        pairs.append((s, t))
    return pairs


@dataclass(frozen=True)
class Objectives:
    """Which losses to compute and how: weights, temperature, the ce scope, causal or masked LM."""

    weights: Mapping[str, float]
    causal: bool = False
    temperature: float = 2.0
    ce_scope: str = "all"
    atkd_lambda: float = 0.2
    atkd_hard_fraction: float = 0.5

    @property
    def counterfactual(self) -> bool:
        return "diito" in self.weights or "diito_cos" in self.weights


def counterfactual(model: nn.Module, inputs: Mapping, recording, layers: tuple[int, ...], plan: InterchangePlan,
                   call: Callable | None = None, keep_last: bool = False):
    """The model's output on `inputs` with `plan`'s spans swapped at `layers.{j}.output` for j in `layers`.

    Sources come from `recording` (the standard pass on the same inputs); blocks up to min(layers) are
    replayed from it. With `keep_last`, also returns the last block's (intervened) output.
    """
    last = recording.num_layers - 1
    captured = {}

    def handler(j):
        def fn(current):
            new = plan.mix(current, recording.value(j)) if j in layers else current
            if keep_last and j == last:
                captured["last"] = new
            return new
        return fn

    sites = set(layers) | ({last} if keep_last else set())
    with replay_blocks(model, recording, upto=min(layers)), \
            set_value(model, {f"layers.{j}.output": handler(j) for j in sorted(sites)}):
        out = (call or model)(**inputs)
    return out, captured.get("last")


def distill_losses(student: nn.Module, teacher: nn.Module | None, inputs: Mapping, labels: torch.Tensor,
                   objectives: Objectives, plan: InterchangePlan | None = None,
                   pair: tuple[int, tuple[int, ...]] | None = None, projection: nn.Module | None = None,
                   student_call: Callable | None = None) -> dict[str, torch.Tensor]:
    """Every weighted loss of one batch, plus 'loss' (their weighted sum).

    `inputs`: the (masked) model inputs; `labels`: MLM labels (-100 where not predicted) or CLM labels.
    `student_call` runs the student's standard pass (e.g. its DDP wrapper); default `student` itself.
    `plan` and `pair` (student layer, teacher layers) are needed for 'diito' / 'diito_cos'.
    """
    w = objectives.weights
    mask = inputs["attention_mask"]
    project = projection if projection is not None else (lambda h: h)
    losses: dict[str, torch.Tensor] = {}
    if teacher is None:  # plain language modelling (e.g. pretraining a teacher)
        if set(w) - {"mlm", "clm"}:
            raise DistillConfigError(f"objectives {sorted(set(w) - {'mlm', 'clm'})} need a teacher")
        logits = (student_call or student)(**inputs).logits
        losses.update({k: (obj.mlm_loss if k == "mlm" else obj.clm_loss)(logits, labels) for k in w})
        losses["loss"] = sum(w[k] * losses[k] for k in w)
        return losses
    with torch.no_grad(), record_blocks(teacher) as t_rec:
        t_logits = teacher(**inputs).logits
    with record_blocks(student) as s_rec:
        s_logits = (student_call or student)(**inputs).logits
    obj.check_vocab(s_logits, t_logits)
    if "mlm" in w:
        losses["mlm"] = obj.mlm_loss(s_logits, labels)
    if "clm" in w:
        losses["clm"] = obj.clm_loss(s_logits, labels)
    if "ce" in w:
        scope = mask if objectives.ce_scope == "all" or objectives.causal else (labels != -100)
        losses["ce"] = obj.kd_loss(s_logits, t_logits, scope, objectives.temperature)
    for name in ("atkd", "atkd_reverse"):  # ATKD on the labels' target tokens (next token for CLM)
        if name in w:
            cfg = ATKDConfig(lam=objectives.atkd_lambda, hard_fraction=objectives.atkd_hard_fraction,
                             reverse=name == "atkd_reverse")
            losses[name] = atkd_objective(s_logits, t_logits, labels, causal=objectives.causal, config=cfg,
                                          check=False)[0]
    if "cos" in w:
        losses["cos"] = obj.cosine_loss(project(s_rec.value(s_rec.num_layers - 1)),
                                        t_rec.value(t_rec.num_layers - 1), mask)
    # The losses keep what their backward needs; the [batch, seq, vocab] logits themselves can go now,
    # before the counterfactual pass makes two more of them.
    del s_logits, t_logits
    if objectives.counterfactual:
        if plan is None or pair is None:
            raise DistillConfigError("diito objectives need an interchange plan and an aligned (student, teacher) pair")
        s_layer, t_layers = pair
        keep = "diito_cos" in w
        with torch.no_grad():
            t_out, t_last = counterfactual(teacher, inputs, t_rec, t_layers, plan, keep_last=keep)
        s_out, s_last = counterfactual(student, inputs, s_rec, (s_layer,), plan, keep_last=keep)
        if "diito" in w:
            losses["diito"] = obj.kd_loss(s_out.logits, t_out.logits, mask, objectives.temperature)
        del s_out, t_out
        if keep:
            losses["diito_cos"] = obj.cosine_loss(project(s_last), t_last, mask)
    losses["loss"] = sum(w[k] * losses[k] for k in w)
    return losses
