"""TED's two stages on Hugging Face models: task data, block outputs, the training loops, filter files.

Stage 1 (`stage1`): the model frozen; its filters and their task heads learn the task. Stage 2
(`stage2`): the teacher and its filters frozen; the student and its filters learn
L_task + α_KL·T²·KL + α_MSE·MSE (ted.stage2_loss); `mode='kd'` / `'lwd'` are the baselines on the same
loop. Block outputs come from the core's `record_blocks` (raw ``layers.{i}.output``, gradients kept).
Filters live apart from the model: the exported student is the plain HF model (`export`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

from interventions import SiteGraph, record_blocks

from .data import read_texts
from .errors import DataError, DistillConfigError, IncompatibleModelsError
from .models import is_causal_lm
from .sst import read_labelled
from .ted import (
    Task,
    TEDConfig,
    TEDFilters,
    filtered_layers,
    pair_layers,
    stage1_loss,
    stage2_loss,
    task_loss,
)

TASKS = ("classification", "lm")


@dataclass(frozen=True)
class LoopOptions:
    """Optimisation of one stage (AdamW, linear warmup then decay, gradient clipping)."""

    steps: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_length: int = 64
    seed: int = 0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length"):
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
class TaskData:
    """Tokenized examples (lists of ids) and their labels (class ids; None for language modelling)."""

    ids: list
    labels: list | None
    pad_id: int
    task: Task

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> tuple[dict, torch.Tensor]:
        """Right-padded inputs and labels (LM: the input ids, -100 on padding) of the given rows."""
        rows = [int(r) for r in rows]
        width = max(len(self.ids[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(self.ids[r])] = torch.tensor(self.ids[r])
            mask[i, : len(self.ids[r])] = 1
        if self.task == "classification":
            labels = torch.tensor([self.labels[r] for r in rows])
        else:
            labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask}, labels


def task_data(path: str, tokenizer, task: Task, max_length: int, num_labels: int | None = None,
              limit: int | None = None) -> TaskData:
    """A tsv (`sentence<TAB>label`) for classification, text lines (.txt/.jsonl) for language modelling."""
    if task == "classification":
        texts, labels = read_labelled(path, num_labels)
    else:
        texts, labels = read_texts(path), None
    if limit is not None:
        texts, labels = texts[:limit], (labels[:limit] if labels is not None else None)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DistillConfigError("the tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
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


def batches(data: TaskData, options: LoopOptions):
    """`options.steps` batches of seeded random rows (reshuffled every epoch)."""
    g = torch.Generator().manual_seed(options.seed)
    order: list[int] = []
    for _ in range(options.steps):
        if len(order) < options.batch_size:
            order += torch.randperm(len(data), generator=g).tolist()
        rows, order = order[: options.batch_size], order[options.batch_size:]
        yield data.batch(rows)


# -- forward passes ----------------------------------------------------------------------------------
def forward_states(model: nn.Module, inputs: dict, layers: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's logits and the raw outputs of blocks `layers` ([batch, seq, hidden] each)."""
    with record_blocks(model, layers=layers) as rec:
        logits = model(**inputs).logits
    return logits, [rec.value(i) for i in layers]


def _optimiser(params, options: LoopOptions):
    opt = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=options.weight_decay)
    warm = max(1, math.ceil(options.warmup_ratio * options.steps))
    total = options.steps

    def factor(step):
        return min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _update(loss, params, opt, sched, options: LoopOptions):
    if not torch.isfinite(loss):
        raise DistillConfigError(f"non-finite loss {float(loss)}: lower the learning rate or check the data")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
    opt.step()
    sched.step()


def finetune(model: nn.Module, data: TaskData, options: LoopOptions) -> list[float]:
    """Plain task training of the whole model (e.g. a teacher before distillation); returns the losses."""
    task = task_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _optimiser(params, options)
    model.train()
    losses = []
    for inputs, labels in batches(data, options):
        loss = task_loss(model(**inputs).logits, labels, task)
        _update(loss, params, opt, sched, options)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


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
    model.eval().requires_grad_(False)
    params = list(filters.parameters())
    opt, sched = _optimiser(params, options)
    filters.train()
    losses = []
    for inputs, labels in batches(data, options):
        with torch.no_grad():
            _, states = forward_states(model, inputs, layers)
        loss = stage1_loss(filters, states, labels, task)
        _update(loss, params, opt, sched, options)
        losses.append(float(loss.detach()))
    return filters.eval(), losses


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
           student_filters: TEDFilters | None = None) -> tuple[TEDFilters | None, list[dict]]:
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
        student_filters = TEDFilters(s_layers, hidden_size(student), hidden_size(teacher), "linear", task,
                                     num_outputs(student, task))
        teacher_filters = None
    elif config.mode == "kd":
        t_layers = s_layers = []
        student_filters = teacher_filters = None
    else:
        raise DistillConfigError(f"mode must be 'ted', 'kd' or 'lwd', got {config.mode!r}")
    teacher.eval().requires_grad_(False)
    if teacher_filters is not None:
        teacher_filters.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    params = list(student.parameters())
    if student_filters is not None:
        student_filters.train().requires_grad_(True)
        params += list(student_filters.filters.parameters())  # the heads take no part in stage 2
    opt, sched = _optimiser(params, options)
    log = []
    for inputs, labels in batches(data, options):
        with torch.no_grad():
            t_logits, t_states = forward_states(teacher, inputs, t_layers)
        s_logits, s_states = forward_states(student, inputs, s_layers)
        loss, parts = stage2_loss(config, student_logits=s_logits, teacher_logits=t_logits, labels=labels,
                                  task=task, student_states=s_states, teacher_states=t_states,
                                  mask=inputs["attention_mask"], student_filters=student_filters,
                                  teacher_filters=teacher_filters)
        _update(loss, params, opt, sched, options)
        log.append({"loss": float(loss.detach()), **parts})
    student.eval()
    return (student_filters.eval() if student_filters is not None else None), log


# -- evaluation and export ------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, batch_size: int = 64) -> dict:
    """Accuracy (classification) or perplexity (language modelling) on `data`."""
    task = task_of(model)
    model.eval()
    right = total = 0
    nll = 0.0
    for start in range(0, len(data), batch_size):
        inputs, labels = data.batch(range(start, min(start + batch_size, len(data))))
        logits = model(**inputs).logits
        if task == "classification":
            right += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        else:
            nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                         ignore_index=-100, reduction="sum"))
            total += int((labels[:, 1:] != -100).sum())
    if task == "classification":
        return {"accuracy": right / max(total, 1), "examples": total}
    return {"perplexity": math.exp(nll / max(total, 1)), "tokens": total}


def export(student: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """The student alone (save_pretrained); TED filters and heads are not part of it."""
    from .models import enable_cache

    out = Path(out_dir)
    enable_cache(student)
    student.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
