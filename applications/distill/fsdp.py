"""FSDP for distillation: the `--fsdp` / `--fsdp-config` options, the teacher's placement, the fallback report.

The student is sharded by the Trainer itself (`TrainingArguments.fsdp`, accelerate's FSDP2 plugin); this
module only turns the options into TrainingArguments (checked before anything loads, with the student's
transformer block as the default wrap class), shards or offloads the frozen teacher (torch `fully_shard`
on its blocks and root, or accelerate's `cpu_offload`), and reports when accelerate silently did not
enable FSDP (it does so only on GPUs: on the CPU `fsdp` falls back to DDP or to one plain process).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from interventions import SiteGraph

from .errors import DistillConfigError

logger = logging.getLogger("applications.distill")

#: `--fsdp` words (TrainingArguments' spellings) -> the FSDP2 `fsdp_config` entries they stand for.
FSDP_WORDS = {
    "full_shard": {"reshard_after_forward": True},
    "shard_grad_op": {"reshard_after_forward": False},
    "offload": {"cpu_offload": True},
    "auto_wrap": {},
}
#: FSDP1-only strategies: transformers 5 deprecates FSDP1 (removed in 5.20), so they are refused.
FSDP1_WORDS = ("no_shard", "hybrid_shard", "hybrid_shard_zero2")
#: The `fsdp_config` keys TrainingArguments reads (an `fsdp_` prefix is dropped, as it does).
CONFIG_KEYS = ("version", "min_num_params", "transformer_layer_cls_to_wrap", "auto_wrap_policy", "cpu_offload",
               "cpu_ram_efficient_loading", "state_dict_type", "activation_checkpointing",
               "reshard_after_forward")
WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
TEACHER_OFFLOAD = ("none", "cpu")


@dataclass(frozen=True)
class FsdpOptions:
    """Checked `--fsdp` / `--fsdp-config` / `--teacher-offload`: `words` are the FSDP words asked for (empty:
    FSDP off), `config` the fsdp_config they and the file amount to, `teacher_offload` 'none' or 'cpu'."""

    words: tuple[str, ...] = ()
    config: tuple[tuple[str, Any], ...] = ()
    teacher_offload: str = "none"

    @property
    def enabled(self) -> bool:
        return bool(self.words)

    def training_arguments(self, block_class: str | None) -> dict:
        """TrainingArguments' `fsdp` / `fsdp_config`: the student's block class is the default wrap class.

        Empty in a process not launched by torchrun / accelerate launch: the Trainer refuses FSDP there, so
        such a run trains unsharded, and `fsdp_report` says so."""
        if not self.enabled or not launched():
            return {}
        config = dict(self.config)
        if config.get("auto_wrap_policy", WRAP_POLICIES[0]) == WRAP_POLICIES[0] \
                and not config.get("transformer_layer_cls_to_wrap") and block_class:
            config["transformer_layer_cls_to_wrap"] = [block_class]
        return {"fsdp": True, "fsdp_config": config}


def parse_options(fsdp: str | bool | None, fsdp_config: Any = None, teacher_offload: str | None = None) -> FsdpOptions:
    """Check the options (before anything loads): known words, a readable JSON mapping of known keys."""
    offload = (teacher_offload or "none").lower()
    if offload not in TEACHER_OFFLOAD:
        raise DistillConfigError(f"teacher_offload (--teacher-offload) must be one of {', '.join(TEACHER_OFFLOAD)}, "
                                 f"got {teacher_offload!r}")
    words = _words(fsdp)
    config = _config(fsdp_config)
    if config and not words:
        raise DistillConfigError("fsdp_config (--fsdp-config) is given but FSDP is off: add --fsdp (e.g. "
                                 "--fsdp 'full_shard auto_wrap', or --fsdp true to take everything from the config)")
    merged: dict[str, Any] = {}
    for word in words:
        merged.update(FSDP_WORDS.get(word, {}))
    merged.update(config)  # the config file's explicit values win over the words' (as in TrainingArguments)
    return FsdpOptions(words, tuple(merged.items()), offload)


def _words(fsdp) -> tuple[str, ...]:
    if fsdp is None or fsdp is False or (isinstance(fsdp, str) and fsdp.strip().lower() in ("", "false", "no")):
        return ()
    if fsdp is True or (isinstance(fsdp, str) and fsdp.strip().lower() in ("true", "yes")):
        return ("true",)
    items = fsdp.replace(",", " ").split() if isinstance(fsdp, str) else list(fsdp)
    valid = f"valid: {', '.join(FSDP_WORDS)} (space-separated, e.g. 'full_shard auto_wrap'), or true"
    for item in items:
        if item in FSDP1_WORDS:
            raise DistillConfigError(f"fsdp (--fsdp) {item!r} is an FSDP1 strategy (deprecated in transformers 5); "
                                     f"this trainer uses FSDP2: {valid}")
        if item not in FSDP_WORDS:
            raise DistillConfigError(f"unknown fsdp (--fsdp) option {item!r}; {valid}")
    if "full_shard" in items and "shard_grad_op" in items:
        raise DistillConfigError("fsdp (--fsdp) gives both full_shard and shard_grad_op; choose one")
    return tuple(items)


def _config(value) -> dict:
    """--fsdp-config as a dict: a mapping (config file), inline JSON, or the path of a JSON file."""
    if value is None or value == "":
        return {}
    where = "fsdp_config (--fsdp-config)"
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            if not Path(text).is_file():
                raise DistillConfigError(f"{where} {value!r} is neither inline JSON (a {{...}} mapping) nor an "
                                         "existing JSON file")
            text = Path(text).read_text()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DistillConfigError(f"{where}: cannot parse {value!r} as JSON: {e}") from None
    if not isinstance(value, dict):
        raise DistillConfigError(f"{where} must be a JSON mapping of FSDP settings, got {type(value).__name__}")
    config = {k.removeprefix("fsdp_"): v for k, v in value.items()}
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise DistillConfigError(f"{where}: unknown keys {unknown}; valid keys: {', '.join(CONFIG_KEYS)}")
    if int(config.get("version", 2)) != 2:
        raise DistillConfigError(f"{where}: version {config['version']!r}; this trainer uses FSDP2 (version 2): "
                                 "FSDP1 is deprecated in transformers 5")
    if config.get("auto_wrap_policy", WRAP_POLICIES[0]) not in WRAP_POLICIES:
        raise DistillConfigError(f"{where}: auto_wrap_policy {config['auto_wrap_policy']!r}; valid: "
                                 f"{', '.join(WRAP_POLICIES)}")
    if config.get("state_dict_type", "FULL_STATE_DICT") != "FULL_STATE_DICT":
        raise DistillConfigError(f"{where}: state_dict_type {config['state_dict_type']!r}; only FULL_STATE_DICT: "
                                 "the saved student is a plain save_pretrained directory")
    cls = config.get("transformer_layer_cls_to_wrap")
    if isinstance(cls, str):
        config["transformer_layer_cls_to_wrap"] = cls = [c.strip() for c in cls.split(",") if c.strip()]
    if cls is not None and not (isinstance(cls, list) and all(isinstance(c, str) for c in cls)):
        raise DistillConfigError(f"{where}: transformer_layer_cls_to_wrap must be a class name or a list of them "
                                 f"(e.g. ['GPT2Block']), got {cls!r}")
    return config


def block_class(model: nn.Module) -> str | None:
    """The class name of the model's transformer block (the site graph's block list; else _no_split_modules)."""
    graph = SiteGraph.from_model(model)
    if graph.num_layers and graph.layers_path:
        return type(model.get_submodule(graph.layers_path)[0]).__name__
    names = getattr(model, "_no_split_modules", None) or []
    return names[0] if names else None


def check_wrap_classes(options: FsdpOptions, model: nn.Module) -> None:
    """Every class the FSDP config names to wrap is a module of the student (accelerate would fail only later,
    under the launcher); checked in any process, launched or not."""
    names = dict(options.config).get("transformer_layer_cls_to_wrap") or [] if options.enabled else []
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        raise DistillConfigError(f"fsdp_config transformer_layer_cls_to_wrap {missing} are not modules of the "
                                 f"student ({type(model).__name__}); its block class is {block_class(model)!r}")


# -- the teacher ---------------------------------------------------------------------------------------
def shard_frozen(model: nn.Module, mesh=None) -> nn.Module:
    """Shard a frozen, forward-only model with torch's `fully_shard`: each block, then the root (the rest).

    Every rank keeps 1/world of the weights; a block's weights are gathered for its forward and freed after."""
    from torch.distributed.fsdp import fully_shard

    model.eval().requires_grad_(False)
    graph = SiteGraph.from_model(model)
    for block in model.get_submodule(graph.layers_path):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    return fully_shard(model, mesh=mesh, reshard_after_forward=True)


def place_teacher(teacher: nn.Module, trainer, offload: str = "none") -> bool:
    """Put the frozen teacher where this run wants it; True when placed here (not moved to the device whole).

    offload 'cpu': weights stay in CPU memory and each module's are copied to the device for its forward
    (accelerate's `cpu_offload`); under FSDP: sharded like the student (`shard_frozen`); else: False."""
    if offload == "cpu":
        from accelerate import cpu_offload

        cpu_offload(teacher, execution_device=trainer.args.device)
        return True
    if getattr(trainer, "is_fsdp_enabled", False):
        shard_frozen(teacher)
        return True
    return False


# -- the report ----------------------------------------------------------------------------------------
def fsdp_report(options: FsdpOptions, trainer, live_teacher: bool = True) -> dict | None:
    """What was asked and what accelerate did; a warning when FSDP was asked for but is not on (the fallback).

    None when neither --fsdp, an `accelerate launch` FSDP config, nor a teacher offload was asked for."""
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (options.enabled or from_launcher or options.teacher_offload != "none"):
        return None
    enabled = bool(getattr(trainer, "is_fsdp_enabled", False))
    kind = str(getattr(trainer.accelerator.state, "distributed_type", "NO")).split(".")[-1]
    requested = " ".join(options.words) if options.enabled else ("accelerate launch" if from_launcher else None)
    report = {"requested": requested, "enabled": enabled, "distributed_type": kind,
              "world_size": trainer.args.world_size, "device": str(trainer.args.device),
              "teacher": _teacher_placement(options, enabled) if live_teacher else "none (stored teacher logits)"}
    if requested is not None and not enabled:
        if kind == "MULTI_CPU":
            why = ("accelerate enables FSDP only on GPUs; on the CPU this run fell back to DDP (gloo): every process "
                   "holds the whole student and teacher")
        elif kind == "NO":
            why = ("a single process, not launched by torchrun or accelerate launch: the Trainer runs FSDP only in a "
                   "distributed launch (and accelerate enables it only on GPUs); the run trained without sharding")
        else:
            why = f"accelerate chose {kind}, not FSDP"
        report["why"] = why
        logger.warning("FSDP was requested (--fsdp %s) but is NOT enabled: %s.", requested, why)
    return report


def _teacher_placement(options: FsdpOptions, enabled: bool) -> str:
    if options.teacher_offload == "cpu":
        return "offloaded to cpu (accelerate cpu_offload)"
    return "sharded (fully_shard on blocks and root)" if enabled else "whole, on the device"


def launched() -> bool:
    """True under torchrun / accelerate launch (they set LOCAL_RANK): the only runs the Trainer allows FSDP in."""
    return int(os.environ.get("LOCAL_RANK", "-1")) != -1
