"""Typed options of a distillation run (frozen dataclasses), shared by the CLI and config files.

`DistillConfig.from_sources(file, overrides)` merges a YAML/JSON file with command-line values;
`objective_weights` turns ``"mlm,ce,cos,diito"`` or ``"ce=0.5,clm=0.5"`` into weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .errors import DistillConfigError

OBJECTIVES = ("mlm", "clm", "ce", "cos", "diito", "diito_cos", "atkd", "atkd_reverse")
ALIGNMENTS = ("full", "middle", "late")
SPAN_MODES = ("consecutive", "random", "masked")
#: The paper's recipes (Wu et al., NAACL 2022): DIITO 0.25 each; the standard baseline 1/3 each.
RECIPES = {
    "diito": {"ce": 0.25, "mlm": 0.25, "cos": 0.25, "diito": 0.25},
    "standard": {"ce": 1 / 3, "mlm": 1 / 3, "cos": 1 / 3},
    "full_cos": {"ce": 0.2, "mlm": 0.2, "cos": 0.2, "diito": 0.2, "diito_cos": 0.2},
}
#: DistilBERT's rule for which teacher layers initialise the student.
DISTILBERT_LAYERS = (0, 2, 4, 7, 9, 11)


def objective_weights(spec: str | dict | None, recipe: str | None = "diito") -> dict[str, float]:
    """Weights per objective from a spec ("mlm,ce" -> equal weights; "ce=0.7,mlm=0.3") or a recipe."""
    if spec is None or spec == "" or spec == {}:
        if recipe not in RECIPES:
            raise DistillConfigError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
        return dict(RECIPES[recipe])
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        parts = [p.strip() for p in str(spec).split(",") if p.strip()]
        for part in parts:
            name, _, w = part.partition("=")
            items.append((name.strip(), w.strip() or None))
    if not items:
        raise DistillConfigError(f"no objectives in {spec!r}; valid objectives: {', '.join(OBJECTIVES)}")
    weights: dict[str, float] = {}
    for name, w in items:
        if name not in OBJECTIVES:
            raise DistillConfigError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}")
        try:
            weights[name] = 1.0 / len(items) if w is None else float(w)
        except ValueError as e:
            raise DistillConfigError(f"weight of objective {name!r} must be a number, got {w!r}") from e
        if weights[name] < 0:
            raise DistillConfigError(f"weight of objective {name!r} must be >= 0, got {weights[name]}")
    if "mlm" in weights and "clm" in weights:
        raise DistillConfigError("choose one of 'mlm' (masked LM) and 'clm' (causal LM), not both")
    return weights


@dataclass(frozen=True)
class DistillConfig:
    """Every option of `train` (names match the CLI flags with dashes for underscores)."""

    teacher: str | None = None
    train_file: str | None = None
    output_dir: str = "outputs/distill"
    eval_file: str | None = None
    student: str | None = None  # an existing student to start from, instead of copying teacher layers
    student_layers: Any = 6  # a count (DistilBERT rule) or an explicit list of teacher layers
    objectives: Any = None  # None: the recipe's objectives
    recipe: str = "diito"
    temperature: float = 2.0
    atkd_lambda: float = 0.2  # ATKD (objectives atkd / atkd_reverse): weight of the easy tokens' DKD
    atkd_hard_fraction: float = 0.5  # ATKD: share of tokens, by teacher uncertainty, that are hard
    ce_scope: str = "all"  # "all" non-pad tokens (the paper), or "masked" only
    alignment: str = "full"
    span_mode: str = "consecutive"
    span_fraction: float = 0.3
    mlm_probability: float = 0.15
    mask_split: tuple = (0.8, 0.1, 0.1)  # [MASK], keep, random
    mlm_smoothing: float = 0.7  # masking probability ∝ count ** -mlm_smoothing
    cos_projection: bool = False
    max_length: int = 128
    batch_size: int = 8  # per device
    grad_accum: int = 1
    learning_rate: float = 5e-4
    betas: tuple = (0.9, 0.98)
    adam_epsilon: float = 1e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 5.0
    max_steps: int = -1
    num_epochs: float = 3.0
    save_steps: int = 500
    logging_steps: int = 10
    seed: int = 56
    resume: Any = None  # a checkpoint directory, or True for the latest in output_dir
    overwrite_output_dir: bool = False  # replace the previous run's files in a non-empty output_dir
    vocab_size: int | None = None  # for a tokenizer trained when the teacher has none
    text_column: str = "text"
    progress: bool = True
    plot: bool = True
    bf16: bool = False  # bf16 autocast (CPU and GPU)
    fp16: bool = False  # fp16 autocast with loss scaling (GPU; on a CPU it runs as bf16 autocast)
    teacher_dtype: str | None = None  # float32, bfloat16 or float16: the frozen teacher's dtype
    eval_steps: int | None = None  # evaluate --eval-file every N steps (its losses in the logs)

    def __post_init__(self):
        if self.alignment not in ALIGNMENTS:
            raise DistillConfigError(f"unknown alignment {self.alignment!r}; valid: {', '.join(ALIGNMENTS)}")
        if self.span_mode not in SPAN_MODES:
            raise DistillConfigError(f"unknown span mode {self.span_mode!r}; valid: {', '.join(SPAN_MODES)}")
        if self.ce_scope not in ("all", "masked"):
            raise DistillConfigError(f"ce_scope must be 'all' or 'masked', got {self.ce_scope!r}")
        if self.recipe not in RECIPES:
            raise DistillConfigError(f"unknown recipe {self.recipe!r}; valid recipes: {', '.join(RECIPES)}")
        if not 0 < self.span_fraction <= 1:
            raise DistillConfigError(f"span_fraction must be in (0, 1], got {self.span_fraction}")
        if not 0 < self.mlm_probability < 1:
            raise DistillConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if len(self.mask_split) != 3 or abs(sum(self.mask_split) - 1) > 1e-6 or min(self.mask_split) < 0:
            raise DistillConfigError(f"mask_split must be 3 non-negative shares summing to 1, got {self.mask_split}")
        from .atkd import ATKDConfig

        ATKDConfig(lam=self.atkd_lambda, hard_fraction=self.atkd_hard_fraction)  # raises on bad values
        if self.temperature <= 0:
            raise DistillConfigError(f"temperature must be > 0, got {self.temperature}")
        for name in ("batch_size", "grad_accum", "max_length"):
            if int(getattr(self, name)) < 1:
                raise DistillConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "mask_split", tuple(float(x) for x in self.mask_split))
        object.__setattr__(self, "betas", tuple(float(x) for x in self.betas))

    @property
    def weights(self) -> dict[str, float]:
        """The objectives and their weights (the recipe's when none are given)."""
        return objective_weights(self.objectives, self.recipe)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_sources(cls, config_file: str | None = None, **overrides) -> DistillConfig:
        """Options from a YAML/JSON file, then `overrides` (values that are None are ignored)."""
        values: dict[str, Any] = {}
        if config_file:
            values.update(load_config_file(config_file))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DistillConfigError(f"unknown options {unknown}; valid options: {', '.join(sorted(known))}")
        return cls(**values)

    def replace(self, **changes) -> DistillConfig:
        return replace(self, **changes)


def load_config_file(path: str) -> dict:
    """A YAML or JSON mapping of options (keys with dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise DistillConfigError(f"config file {path!r} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # any parse error becomes one clear message
        raise DistillConfigError(f"cannot parse config file {path!r}: {e}") from e
    if not isinstance(data, dict):
        raise DistillConfigError(f"config file {path!r} must hold a mapping of options, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def student_layer_indices(spec, n_teacher: int) -> list[int]:
    """Which teacher layers initialise the student: a count (DistilBERT rule) or an explicit list."""
    if isinstance(spec, str):
        spec = [int(x) for x in spec.split(",")] if "," in spec else int(spec)
    if isinstance(spec, int):
        if not 1 <= spec <= n_teacher:
            raise DistillConfigError(f"student_layers must be in 1..{n_teacher} (the teacher's layers), got {spec}")
        rule = list(DISTILBERT_LAYERS[:spec])
        if len(rule) == spec and rule[-1] < n_teacher:
            return rule
        # Where the rule does not fit: teacher layers evenly spread from the first to the last.
        if spec == 1:
            return [0]
        return sorted({round(k * (n_teacher - 1) / (spec - 1)) for k in range(spec)})
    layers = [int(x) for x in spec]
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if not layers or bad or len(set(layers)) != len(layers):
        raise DistillConfigError(
            f"student_layers {layers} must be distinct teacher layers in 0..{n_teacher - 1}"
        )
    return layers

