"""Typed options of a distillation run (frozen dataclasses), shared by the CLI and config files.

`DistillConfig.from_sources(file, overrides)` merges a YAML/JSON file with command-line values;
`objective_weights` turns ``"mlm,ce,cos,diito"`` or ``"ce=0.5,clm=0.5"`` into weights.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
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
    max_steps: int | None = None  # unset: train for num_epochs; set: exactly this many optimizer steps
    num_epochs: float = 3.0
    save_steps: int = 500
    logging_steps: int = 10
    seed: int = 56
    eval_batch_size: int = 16  # evaluation batches (IIA pairs sources within a batch): the `eval` default
    resume: Any = None  # a checkpoint directory, or True for the latest in output_dir
    overwrite_output_dir: bool = False  # replace the previous run's files in a non-empty output_dir
    vocab_size: int | None = None  # for a tokenizer trained when the teacher has none
    text_column: str = "text"
    streaming: bool = False  # read --train-file as a stream (streaming.py): constant memory, needs --max-steps
    shuffle_buffer: int = 0  # with --streaming: shuffle within a buffer of this many examples (0: file order)
    progress: bool = True
    plot: bool = True
    bf16: bool = False  # bf16 autocast (CPU and GPU)
    fp16: bool = False  # fp16 autocast with loss scaling (GPU; on a CPU it runs as bf16 autocast)
    teacher_dtype: str | None = None  # float32, bfloat16 or float16: the frozen teacher's dtype
    eval_steps: int | None = None  # evaluate --eval-file every N steps (its losses in the logs)
    teacher_logits: str | None = None  # train from stored teacher logits (teacher_logits.py), not a live teacher
    fsdp: Any = None  # TrainingArguments.fsdp: e.g. "full_shard auto_wrap", "full_shard offload auto_wrap" (fsdp.py)
    fsdp_config: Any = None  # TrainingArguments.fsdp_config: a JSON file, inline JSON, or a mapping in a config file
    teacher_offload: str | None = None  # "cpu": the teacher's weights stay in CPU memory (accelerate cpu_offload)

    def __post_init__(self):
        for name, hint in _field_types().items():  # flags and config-file values alike: one typed path
            object.__setattr__(self, name, _coerce(name, hint, getattr(self, name)))
        object.__setattr__(self, "student_layers", _student_layers(self.student_layers))
        object.__setattr__(self, "objectives", _objectives(self.objectives))
        object.__setattr__(self, "resume", _resume(self.resume))
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
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise DistillConfigError(f"betas must be 2 numbers in [0, 1), e.g. 0.9,0.98; got {self.betas}")
        from .objectives.atkd import ATKDConfig

        ATKDConfig(lam=self.atkd_lambda, hard_fraction=self.atkd_hard_fraction)  # raises on bad values
        if self.temperature <= 0:
            raise DistillConfigError(f"temperature must be > 0, got {self.temperature}")
        for name in AT_LEAST_ONE:
            value = getattr(self, name, None)
            if value is not None and value < 1:
                hint = " (leave it unset to train for --num-train-epochs)" if name == "max_steps" else ""
                raise DistillConfigError(f"{name} ({_flag(name)}) must be >= 1, got {value}{hint}")
        if not self.num_epochs > 0:
            raise DistillConfigError(f"num_epochs ({_flag('num_epochs')}) must be > 0, got {self.num_epochs}; "
                                     "or give --max-steps")
        if not 0 <= self.warmup_ratio < 1:
            raise DistillConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("learning_rate", "max_grad_norm", "adam_epsilon"):
            if not getattr(self, name) > 0:
                raise DistillConfigError(f"{name} ({_flag(name)}) must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise DistillConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.fsdp_options.teacher_offload != "none" and self.teacher_logits:  # raises on bad FSDP values too
            raise DistillConfigError("--teacher-offload moves a live teacher; with --teacher-logits there is none "
                                     "(drop one of them)")
        weights = self.weights  # raises on an unknown objective or a bad weight
        from .streaming import check_streaming_options

        check_streaming_options(self)
        if ("diito" in weights or "diito_cos" in weights) and self.batch_size < 2:
            raise DistillConfigError(
                f"the counterfactual objectives (diito, diito_cos) swap each example's span with another example "
                f"of its batch, so they need a batch of >= 2 examples per device; got batch_size "
                f"({_flag('batch_size')}) {self.batch_size}"
            )

    @property
    def weights(self) -> dict[str, float]:
        """The objectives and their weights (the recipe's when none are given)."""
        return objective_weights(self.objectives, self.recipe)

    @property
    def fsdp_options(self):
        """The checked FSDP options (fsdp.FsdpOptions)."""
        from .fsdp import parse_options

        return parse_options(self.fsdp, self.fsdp_config, self.teacher_offload)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_sources(cls, config_file: str | None = None, **overrides) -> DistillConfig:
        """Options from a YAML/JSON file, then `overrides` (values that are None are ignored)."""
        values: dict[str, Any] = {}
        if config_file:
            values.update(canonical_keys(load_config_file(config_file), f"config file {config_file!r}"))
        values.update(canonical_keys({k: v for k, v in overrides.items() if v is not None}, "the options"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DistillConfigError(f"unknown options {unknown}; valid options: {', '.join(sorted(known))}")
        return cls(**values)

    def replace(self, **changes) -> DistillConfig:
        return replace(self, **changes)


#: Options that must be >= 1 when given (intervals and counts; max_steps unset means "train by epochs").
AT_LEAST_ONE = ("max_steps", "save_steps", "logging_steps", "eval_steps", "batch_size", "eval_batch_size",
                "grad_accum", "max_length", "vocab_size")
#: Hugging Face TrainingArguments names (and this CLI's earlier spellings) for DistillConfig fields.
ALIASES = {
    "num_train_epochs": "num_epochs", "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
    "resume_from_checkpoint": "resume", "steps": "max_steps", "output": "output_dir",
}
#: The flag each field is spelled as on the command line (TrainingArguments' name where it has one).
FLAGS = {field: "--" + alias.replace("_", "-") for alias, field in ALIASES.items() if alias not in ("steps", "output")}


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def canonical_keys(values: dict, where: str) -> dict:
    """Option names with aliases (TrainingArguments' names, older spellings) replaced by the field names."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name in out:
            raise DistillConfigError(f"{where} give{'s' if where.startswith('config') else ''} {name!r} twice "
                                     f"(as {key!r} and as an alias); keep one")
        out[name] = value
    return out


def _field_types() -> dict:
    return typing.get_type_hints(DistillConfig)


def _coerce(name: str, hint, value):
    """`value` as the field's type: the same conversion for a flag's text and a config file's value."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None:
        if type(None) in allowed or hint is Any:
            return None
        raise DistillConfigError(f"{name} ({_flag(name)}) needs a value")
    kind = next((t for t in allowed if t is not type(None)), Any)
    where = f"{name} ({_flag(name)})"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise DistillConfigError(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise DistillConfigError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise DistillConfigError(f"{where} must be an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise DistillConfigError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DistillConfigError(f"{where} must be a number, got {value!r}") from None
    if kind is tuple:
        items = value.split(",") if isinstance(value, str) else value
        try:
            return tuple(float(x) for x in items)
        except (TypeError, ValueError):
            raise DistillConfigError(f"{where} must be a comma list of numbers, e.g. 0.9,0.98; got {value!r}") \
                from None
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
        raise DistillConfigError(f"{where} must be a string, got {value!r} ({type(value).__name__})")
    return value  # Any: checked by its own rule below


def _student_layers(value):
    """A count of layers (int) or a tuple of teacher layer indices, from an int, a list or '2' / '0,2,4'."""
    shown = ("student_layers (--student-layers) must be a number of layers (e.g. 6) or a comma list of teacher "
             f"layers (e.g. 0,2,4), got {value!r}")
    if isinstance(value, bool):
        raise DistillConfigError(shown)
    if isinstance(value, int):
        return value
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)):
        raise DistillConfigError(shown)
    try:
        layers = tuple(int(str(x).strip()) for x in parts)
    except ValueError:
        raise DistillConfigError(shown) from None
    if isinstance(value, str) and "," not in value:
        return layers[0]
    return layers


def _objectives(value):
    if value is None or isinstance(value, (str, dict)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
        return ",".join(value)
    raise DistillConfigError(f"objectives must be a comma list such as 'mlm,ce' or 'ce=0.7,mlm=0.3' (or a mapping "
                             f"of weights in a config file), got {value!r}")


def _resume(value):
    if value is None or value is False:
        return None
    if value is True or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    raise DistillConfigError(f"resume ({_flag('resume')}) must be a checkpoint directory or 'latest', got {value!r}")


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
    spec = _student_layers(spec)
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



class CLIParser(argparse.ArgumentParser):
    """argparse whose usage errors raise (one line, exit code 2 from `main`) instead of exiting."""

    def error(self, message):
        raise DistillConfigError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value
