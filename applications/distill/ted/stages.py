"""TED's two stages on Hugging Face models: task data, block outputs, the methods, filter files.

Every stage is a `trainer.Method` on the one `DistillTrainer` (device placement, DDP, bf16/fp16,
accumulation, resume, periodic evaluation, logs): `finetune` (TaskTraining: the whole model on the
task), `stage1` (FilterTraining: the model frozen; its filters and their task heads learn the task),
`stage2` (TEDDistillation: the teacher and its filters frozen; the student and its filters learn
L_task + α_KL·T²·KL + α_MSE·MSE, ted.stage2_loss; `mode='kd'` / `'lwd'` are the baselines).
Block outputs come from the core's `record_blocks` (raw ``layers.{i}.output``, gradients kept).
Filters live apart from the model: the exported student is the plain HF model (`export`).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf
from torch import nn
from torch.utils.data import Dataset

from interventions import SiteGraph, record_blocks

from ..data import Collator, read_texts
from ..errors import DataError, DistillConfigError, IncompatibleModelsError
from ..methods import unwrap
from ..models import ensure_pad, is_causal_lm
from ..objectives import nll_sum
from ..objectives.ted import (
    Task,
    TEDConfig,
    TEDFilters,
    filtered_layers,
    pair_layers,
    stage1_loss,
    stage2_loss,
    task_loss,
)
from ..plot import plot_losses
from ..sst import read_labelled
from ..trainer import CSVLogCallback, DistillTrainer, Method

TASKS = ("classification", "lm")


@dataclass(frozen=True)
class LoopOptions:
    """Optimisation of one stage (AdamW, linear warmup then decay, gradient clipping) and the Trainer's run.

    `output_dir` holds checkpoints, log.csv, TensorBoard and the loss curve (None: a temporary
    directory, nothing kept); `resume` a checkpoint directory of that run to continue.
    """

    steps: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_length: int = 64
    seed: int = 0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    logging_steps: int = 1
    save_steps: int | None = None  # None: no intermediate checkpoints
    eval_steps: int | None = None  # with eval data: evaluate the stage's losses every N steps
    output_dir: str | None = None
    resume: str | None = None
    bf16: bool = False
    fp16: bool = False
    teacher_dtype: str | None = None
    progress: bool = False
    plot: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length", "grad_accum", "logging_steps"):
            if int(getattr(self, name)) < 1:
                raise DistillConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise DistillConfigError(f"learning_rate must be > 0, got {self.learning_rate}")


# -- models ------------------------------------------------------------------------------------
def task_of(model_or_config) -> Task:
    """'lm' for causal LMs, 'classification' for sequence classifiers; anything else is refused."""
    config = getattr(model_or_config, "config", model_or_config)
    names = getattr(config, "architectures", None) or [type(model_or_config).__name__]
    if is_causal_lm(model_or_config):
        return "lm"
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "classification"
    raise DistillConfigError(
        f"TED needs a sequence classifier (…ForSequenceClassification) or a causal LM (…ForCausalLM); got {names}"
    )


def load_model(path: str) -> nn.Module:
    """A sequence classifier or causal LM from a save_pretrained directory (its class from config.json)."""
    try:
        config = tf.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DistillConfigError(f"cannot load a model config from {path!r}: {e}") from e
    task = task_of(config)
    auto = tf.AutoModelForCausalLM if task == "lm" else tf.AutoModelForSequenceClassification
    return auto.from_pretrained(path)


def num_outputs(model: nn.Module, task: Task) -> int:
    if task == "classification":
        return int(model.config.num_labels)
    return int(model.get_output_embeddings().weight.shape[0])


def hidden_size(model: nn.Module) -> int:
    return SiteGraph.from_model(model).hidden_size


def num_layers(model: nn.Module) -> int:
    return SiteGraph.from_model(model).num_layers


def check_classifier(model: nn.Module, task: Task) -> None:
    """The filters' heads pool the first token, so classification needs an encoder (BERT-style)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if task == "classification" and model.config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise DistillConfigError(
            f"TED classification pools the first token ([CLS]), which needs an encoder (BERT, RoBERTa, ...); "
            f"{model.config.model_type!r} is not one"
        )


# -- data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskData(Dataset):
    """Tokenized examples (lists of ids) and their labels (class ids; None for language modelling)."""

    ids: list
    labels: list | None
    pad_id: int
    task: Task

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i], "idx": i}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item

    def collator(self) -> Collator:
        """The one collator: right padding; LM labels are the input ids with -100 on padding."""
        return Collator(self.pad_id, lm_labels=self.task == "lm")


def task_data(path: str, tokenizer, task: Task, max_length: int, num_labels: int | None = None,
              limit: int | None = None) -> TaskData:
    """A tsv (`sentence<TAB>label`) for classification, text lines (.txt/.jsonl) for language modelling."""
    if task == "classification":
        texts, labels = read_labelled(path, num_labels)
    else:
        texts, labels = read_texts(path), None
    if limit is not None:
        texts, labels = texts[:limit], (labels[:limit] if labels is not None else None)
    tokenizer = ensure_pad(tokenizer)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    extra = tokenizer.num_special_tokens_to_add()
    truncated = sum(len(x) + extra > max_length for x in tokenizer(texts, add_special_tokens=False,
                                                                    verbose=False)["input_ids"])
    min_len = 2 if task == "lm" else 1
    keep = [i for i, x in enumerate(ids) if len(x) >= min_len]
    if not keep:
        raise DataError(f"{path}: no example has {min_len} or more tokens after tokenizing")
    if truncated or len(keep) < len(ids):
        import logging

        logging.getLogger("applications.distill").warning(
            f"{path}: {len(keep)} examples; {len(ids) - len(keep)} dropped as shorter than {min_len} tokens; "
            f"{truncated} truncated to {max_length} tokens")
    return TaskData([ids[i] for i in keep], [labels[i] for i in keep] if labels is not None else None,
                    tokenizer.pad_token_id, task)


# -- forward passes ----------------------------------------------------------------------------------
def forward_states(model: nn.Module, inputs: dict, layers: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's logits and the raw outputs of blocks `layers` ([batch, seq, hidden] each)."""
    with record_blocks(model, layers=layers) as rec:
        logits = model(**inputs).logits
    return logits, [rec.value(i) for i in layers]


def _model_inputs(inputs: dict) -> dict:
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


# -- the methods -----------------------------------------------------------------------------------
class TaskTraining(Method):
    """Plain task training of the Trainer's model: cross-entropy on the labels (next token for LMs)."""

    def __init__(self, task: Task):
        super().__init__()
        self.task = task

    def losses(self, model, inputs, step):
        return {"loss": task_loss(model(**_model_inputs(inputs)).logits, inputs["labels"], self.task)}


class FilterTraining(Method):
    """Stage 1: the Trainer's model is the filters (with their heads); `lm` is frozen and only read."""

    def __init__(self, lm: nn.Module, layers: list[int], task: Task):
        super().__init__()
        self.lm, self.layers, self.task = lm, list(layers), task

    def frozen(self):
        return [self.lm]

    def losses(self, model, inputs, step):
        with torch.no_grad():
            _, states = forward_states(self.lm, _model_inputs(inputs), self.layers)
        states = [h.float() if h.dtype in (torch.float16, torch.bfloat16) else h for h in states]
        return {"loss": stage1_loss(unwrap(model), states, inputs["labels"], self.task, call=model)}


class TEDDistillation(Method):
    """Stage 2 (TED, KD or LWD): the frozen teacher (and its filters); the student's filters train beside it."""

    def __init__(self, config: TEDConfig, teacher: nn.Module, task: Task, t_layers, s_layers,
                 teacher_filters: TEDFilters | None, student_filters: TEDFilters | None):
        super().__init__()
        self.config, self.task = config, task
        self.teacher, self.teacher_filters, self.student_filters = teacher, teacher_filters, student_filters
        self.t_layers, self.s_layers = list(t_layers), list(s_layers)

    def frozen(self):
        return [m for m in (self.teacher, self.teacher_filters) if m is not None]

    def trainable(self):
        # the heads take no part in stage 2: only the filters train
        return {"student_filters": self.student_filters.filters} if self.student_filters is not None else {}

    def losses(self, model, inputs, step):
        x = _model_inputs(inputs)
        with torch.no_grad():
            t_logits, t_states = forward_states(self.teacher, x, self.t_layers)
        with record_blocks(unwrap(model), layers=self.s_layers) as rec:
            s_logits = model(**x).logits
        s_states = [rec.value(i) for i in self.s_layers]
        loss, parts = stage2_loss(self.config, student_logits=s_logits, teacher_logits=t_logits,
                                  labels=inputs["labels"], task=self.task, student_states=s_states,
                                  teacher_states=t_states, mask=x["attention_mask"],
                                  student_filters=self.student_filters, teacher_filters=self.teacher_filters,
                                  check=False)
        return {"loss": loss, **parts}


def training_arguments(options: LoopOptions, output_dir: str, evaluate: bool = False) -> tf.TrainingArguments:
    """The stage's TrainingArguments: AdamW, linear decay (transformers.get_scheduler; the warmup, as a step
    count, is set by DistillTrainer from `warmup_ratio`)."""
    cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    evaluate_every = {"eval_strategy": "steps", "eval_steps": options.eval_steps,
                      "per_device_eval_batch_size": options.batch_size} if options.eval_steps and evaluate else {}
    return tf.TrainingArguments(
        output_dir=output_dir, max_steps=options.steps, per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum, learning_rate=options.learning_rate,
        weight_decay=options.weight_decay, lr_scheduler_type="linear",
        max_grad_norm=options.max_grad_norm, logging_steps=options.logging_steps,
        save_strategy="steps" if options.save_steps else "no", save_steps=options.save_steps or 500,
        report_to=["tensorboard"] if options.output_dir else [], seed=options.seed, data_seed=options.seed,
        remove_unused_columns=False, disable_tqdm=not options.progress, use_cpu=cpu,
        ddp_backend="gloo" if cpu and distributed else None, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, bf16=bool(options.bf16 or (options.fp16 and cpu)),
        fp16=bool(options.fp16 and not cpu), logging_nan_inf_filter=False, prediction_loss_only=True,
        **evaluate_every)


def run_method(model: nn.Module, method: Method, data: TaskData, options: LoopOptions,
               eval_data: TaskData | None = None, callbacks=()) -> list[dict]:
    """Train `model` (in place) with `method` on the one trainer; returns the logged steps.

    Each log entry: {"loss", and each component without its "loss_" prefix}.
    """
    from transformers.trainer_callback import PrinterCallback

    from ..run import teacher_dtype

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(options.output_dir) if options.output_dir else Path(tmp)
        logs = [CSVLogCallback(out / "log.csv")] if options.output_dir else []
        trainer = DistillTrainer(model=model, args=training_arguments(options, str(out), eval_data is not None),
                                 train_dataset=data, eval_dataset=eval_data if options.eval_steps else None,
                                 data_collator=data.collator(), method=method,
                                 teacher_dtype=teacher_dtype(options.teacher_dtype), warmup_ratio=options.warmup_ratio,
                                 callbacks=[*logs, *callbacks])
        if not options.progress:
            trainer.remove_callback(PrinterCallback)
        trainer.train(resume_from_checkpoint=options.resume)
        if options.output_dir and options.plot and (out / "log.csv").is_file() and trainer.is_world_process_zero():
            plot_losses({"train": out / "log.csv"}, out / "loss_curve.png")
    return [{"loss": e["loss"], **{k[len("loss_"):]: v for k, v in e.items() if k.startswith("loss_")}}
            for e in trainer.state.log_history if "loss" in e]


def finetune(model: nn.Module, data: TaskData, options: LoopOptions, eval_data: TaskData | None = None) -> list[float]:
    """Plain task training of the whole model (e.g. a teacher before distillation); returns the losses."""
    task = task_of(model)
    model.train().requires_grad_(True)
    log = run_method(model, TaskTraining(task), data, options, eval_data)
    model.eval()
    return [e["loss"] for e in log]


# -- stage 1 --------------------------------------------------------------------------------------
def stage1(model: nn.Module, data: TaskData, *, interval: int, width: int | None = None, kind: str = "linear",
           options: LoopOptions = LoopOptions()) -> tuple[TEDFilters, list[float]]:
    """Filters on every `interval`-th block plus one head each, trained on the task with the model frozen."""
    task = task_of(model)
    check_classifier(model, task)
    layers = filtered_layers(num_layers(model), interval)
    d = hidden_size(model)
    torch.manual_seed(options.seed)
    filters = TEDFilters(layers, d, width or d, kind, task, num_outputs(model, task))
    log = run_method(filters, FilterTraining(model, layers, task), data, options)
    return filters.eval(), [e["loss"] for e in log]


FILTER_FORMAT = "ted-filters-v1"


def save_filters(filters: TEDFilters, path: str | Path, model: nn.Module) -> Path:
    """The filters, their heads and what is needed to rebuild them, in one torch file."""
    f0 = filters.filters[0]
    kind = "linear" if isinstance(f0, nn.Linear) else "mlp"
    width = f0.out_features if kind == "linear" else f0[0].out_features
    task = filters.heads[0].task
    meta = {"format": FILTER_FORMAT, "layers": filters.layers, "d_model": hidden_size(model), "width": width,
            "kind": kind, "task": task, "num_outputs": num_outputs(model, task),
            "num_layers": num_layers(model)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "state_dict": filters.state_dict()}, path)
    return path


def load_filters(path: str | Path, who: str = "model") -> TEDFilters:
    """Filters saved by `save_filters`; a missing file says to run stage 1 first."""
    if not path:
        raise DistillConfigError(
            f"TED stage 2 needs the {who}'s stage-1 filter file: pass --{who}-filters (written by "
            f"`python -m applications.distill ted stage1`), or run `ted all`"
        )
    p = Path(path)
    if not p.is_file():
        raise DistillConfigError(
            f"the {who}'s stage-1 filter file {str(path)!r} does not exist; TED stage 2 needs the filters "
            f"trained in stage 1: run `python -m applications.distill ted stage1 --model <{who}> ... "
            f"--output {path}` first (or `ted all`)"
        )
    try:
        saved = torch.load(p, map_location="cpu", weights_only=True)
        meta = saved["meta"]
        if meta.get("format") != FILTER_FORMAT:
            raise KeyError("format")
    except Exception as e:
        raise DistillConfigError(f"{str(path)!r} is not a TED stage-1 filter file ({e})") from e
    filters = TEDFilters(meta["layers"], meta["d_model"], meta["width"], meta["kind"], meta["task"],
                         meta["num_outputs"])
    filters.load_state_dict(saved["state_dict"])
    filters.meta = meta
    return filters.eval()


# -- stage 2 --------------------------------------------------------------------------------------
def _check_pair(teacher: nn.Module, student: nn.Module, task: Task) -> None:
    if task_of(student) != task:
        raise IncompatibleModelsError(f"teacher task {task!r} but student task {task_of(student)!r}")
    nt, ns = num_outputs(teacher, task), num_outputs(student, task)
    if nt != ns:
        what = "classes" if task == "classification" else "vocabulary size"
        raise IncompatibleModelsError(f"teacher and student {what} differ: {nt} vs {ns}")


def _check_filters(filters: TEDFilters, model: nn.Module, who: str, task: Task) -> None:
    meta = getattr(filters, "meta", None)
    d, n = hidden_size(model), num_layers(model)
    if meta is not None and (meta["d_model"] != d or meta["num_layers"] != n or meta["task"] != task):
        raise DistillConfigError(
            f"the {who}'s stage-1 filters were trained for a {meta['num_layers']}-layer model of hidden size "
            f"{meta['d_model']} on task {meta['task']!r}, but the {who} has {n} layers, hidden size {d}, "
            f"task {task!r}; run stage 1 on this {who}"
        )


def stage2(config: TEDConfig, teacher: nn.Module, student: nn.Module, data: TaskData,
           options: LoopOptions = LoopOptions(), teacher_filters: TEDFilters | None = None,
           student_filters: TEDFilters | None = None, eval_data: TaskData | None = None,
           callbacks=()) -> tuple[TEDFilters | None, list[dict]]:
    """Train `student` (in place) against the frozen `teacher`; returns the student's filters and a log."""
    task = task_of(teacher)
    _check_pair(teacher, student, task)
    check_classifier(student, task)
    if config.mode == "ted":
        if teacher_filters is None or student_filters is None:
            raise DistillConfigError("TED stage 2 needs the teacher's and the student's stage-1 filters; "
                                     "run `ted stage1` for both first (or `ted all`)")
        _check_filters(teacher_filters, teacher, "teacher", task)
        _check_filters(student_filters, student, "student", task)
        if len(teacher_filters.layers) != len(student_filters.layers):
            raise DistillConfigError(
                f"teacher has {len(teacher_filters.layers)} filters (layers {teacher_filters.layers}) but the student "
                f"{len(student_filters.layers)} (layers {student_filters.layers}); filter m of the student pairs "
                "with filter m of the teacher, so choose stage-1 intervals giving equal counts")
        t_out = teacher_filters.filters[0]
        s_out = student_filters.filters[0]
        wt = t_out.out_features if isinstance(t_out, nn.Linear) else t_out[-1].out_features
        ws = s_out.out_features if isinstance(s_out, nn.Linear) else s_out[-1].out_features
        if wt != ws:
            raise DistillConfigError(f"filter widths differ: teacher {wt}, student {ws}; give both the same --filter-width")
        t_layers, s_layers = teacher_filters.layers, student_filters.layers
    elif config.mode == "lwd":
        pairs = pair_layers(num_layers(teacher), config.teacher_interval, num_layers(student), config.student_interval)
        t_layers, s_layers = [t for t, _ in pairs], [s for _, s in pairs]
        torch.manual_seed(options.seed)
        student_filters = TEDFilters(s_layers, hidden_size(student), hidden_size(teacher), "linear")  # no heads
        teacher_filters = None
    elif config.mode == "kd":
        t_layers = s_layers = []
        student_filters = teacher_filters = None
    else:
        raise DistillConfigError(f"mode must be 'ted', 'kd' or 'lwd', got {config.mode!r}")
    method = TEDDistillation(config, teacher, task, t_layers, s_layers, teacher_filters, student_filters)
    student.train().requires_grad_(True)
    if student_filters is not None:
        student_filters.filters.requires_grad_(True)
    log = run_method(student, method, data, options, eval_data, callbacks)
    student.eval()
    return (student_filters.eval() if student_filters is not None else None), log


# -- evaluation and export ------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, batch_size: int = 64) -> dict:
    """Accuracy (classification) or perplexity (language modelling) on `data`, on the model's device."""
    task = task_of(model)
    model.eval()
    device = next(model.parameters()).device
    collate = data.collator()
    right = torch.zeros((), dtype=torch.long, device=device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        labels = batch["labels"].to(device)
        logits = model(**{k: batch[k].to(device) for k in ("input_ids", "attention_mask")}).logits
        if task == "classification":
            right += (logits.argmax(-1) == labels).sum()
            total += len(labels)
        else:
            part, n = nll_sum(logits, labels, causal=True)
            nll, total = nll + part.double(), total + n
    total = max(int(total), 1)  # the host reads, once at the end
    if task == "classification":
        return {"accuracy": int(right) / total, "examples": total}
    return {"perplexity": math.exp(float(nll) / total), "tokens": total}


def export(student: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """The student alone (save_pretrained); TED filters and heads are not part of it."""
    from ..models import enable_cache

    out = Path(out_dir)
    enable_cache(student)
    student.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
