"""`train(config)`: everything between a DistillConfig and a saved student directory."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from .batching import BatchRecipe
from .config import DistillConfig, student_layer_indices
from .data import Collator, TokenizedTexts, read_texts, train_tokenizer
from .diito.step import Objectives, aligned_pairs
from .errors import DataError, DistillConfigError
from .fsdp import block_class, check_wrap_classes, fsdp_report, place_teacher
from .masking import token_weights
from .methods import LMDistillation
from .models import enable_cache, ensure_pad, is_causal_lm, load_lm, load_tokenizer, max_tokens
from .output_dir import RUN_FILE, begin_run, claim_output_dir
from .plot import plot_losses
from .streaming import StreamedCorpus, StreamedTexts, streaming_arguments
from .student import build_student, check_compatible, num_layers
from .trainer import CSVLogCallback, DistillTrainer

logger = logging.getLogger("applications.distill")


def resolve_objectives(weights: dict[str, float], causal: bool, explicit: bool) -> dict[str, float]:
    """Swap the recipe's 'mlm' for 'clm' on causal LMs; refuse an explicit mismatch."""
    lm, other = ("clm", "mlm") if causal else ("mlm", "clm")
    if other in weights:
        if explicit:
            kind = "causal" if causal else "masked"
            raise DistillConfigError(f"objective '{other}' does not fit a {kind} LM teacher; use '{lm}'")
        weights = {(lm if k == other else k): v for k, v in weights.items()}
    return weights


def setup_tokenizer(cfg: DistillConfig, teacher_config, texts: list[str], tokenizer=None):
    """The teacher's tokenizer, or one trained on the training texts with the teacher's vocabulary size."""
    tokenizer = tokenizer or (load_tokenizer(cfg.teacher) if cfg.teacher else None)
    vocab = teacher_config.vocab_size
    if tokenizer is None:
        tokenizer = train_tokenizer(texts, cfg.vocab_size or vocab, causal=is_causal_lm(teacher_config))
    if len(tokenizer) > vocab:
        raise DistillConfigError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocabulary only {vocab}")
    return ensure_pad(tokenizer)


def training_arguments(cfg: DistillConfig, drop_last: bool = False, wrap_class: str | None = None) -> TrainingArguments:
    """The paper's optimisation (AdamW, betas (0.9, 0.98), eps 1e-6, 5% warmup, linear decay, clip 5).

    The warmup (cfg.warmup_ratio) is applied by DistillTrainer.create_scheduler, as a step count. With
    --fsdp: `fsdp` / `fsdp_config`, `wrap_class` (the student's block class) the default class to wrap."""
    cpu = not torch.cuda.is_available()
    distributed = _world_size() > 1
    return TrainingArguments(
        output_dir=cfg.output_dir, max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        num_train_epochs=cfg.num_epochs, dataloader_drop_last=drop_last,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1],
        adam_epsilon=cfg.adam_epsilon, weight_decay=cfg.weight_decay, warmup_steps=0,
        lr_scheduler_type="linear", max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, report_to=["tensorboard"], seed=cfg.seed,
        data_seed=cfg.seed, remove_unused_columns=False, disable_tqdm=not cfg.progress, use_cpu=cpu,
        ddp_backend="gloo" if cpu and distributed else None, dataloader_num_workers=0, ddp_find_unused_parameters=False,
        **precision_and_eval(cfg), **cfg.fsdp_options.training_arguments(wrap_class),
    )


def precision_and_eval(cfg) -> dict:
    """TrainingArguments for --bf16 / --fp16 (autocast; on a CPU fp16 falls back to bf16 autocast, which
    is what CPUs support) and periodic evaluation every --eval-steps when an eval file is given."""
    cpu = not torch.cuda.is_available()
    out = {"bf16": bool(cfg.bf16 or (cfg.fp16 and cpu)), "fp16": bool(cfg.fp16 and not cpu),
           "logging_nan_inf_filter": False, "prediction_loss_only": True}
    if cfg.eval_file and cfg.eval_steps:
        out.update(eval_strategy="steps", eval_steps=cfg.eval_steps, per_device_eval_batch_size=cfg.batch_size)
    out.update(streaming_arguments(cfg))  # --streaming: how processes share the stream (streaming.py)
    return out


def teacher_dtype(name: str | None):
    """The --teacher-dtype option as a torch dtype (None: the teacher stays as loaded)."""
    if name in (None, "", "auto"):
        return None
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise DistillConfigError(f"teacher_dtype must be one of {', '.join(dtypes)} (or auto), got {name!r}")
    return dtypes[name]


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_sources(cfg: DistillConfig, teacher: nn.Module | None, tokenizer=None):
    """Before any weights are loaded: teacher and student are LMs of one kind (causal or masked) with one
    vocabulary (its size from the configs; the token -> id mapping itself when both have tokenizers), and
    the student's layer choice fits the teacher.

    Returns (teacher config, student config or None, the tokenizer to use: the given one, the teacher's,
    else the student's, or None)."""
    from .models import load_config
    from .student import check_configs, check_tokenizers

    t_config = teacher.config if teacher is not None else load_config(cfg.teacher)
    s_config = load_config(cfg.student) if cfg.student else None
    if s_config is not None:
        check_configs(s_config, t_config)
    elif getattr(t_config, "num_hidden_layers", None):
        student_layer_indices(cfg.student_layers, t_config.num_hidden_layers)  # raises on a bad layer choice
    t_tok = tokenizer or (load_tokenizer(cfg.teacher) if cfg.teacher else None)
    s_tok = load_tokenizer(cfg.student) if cfg.student else None
    if t_tok is not None and s_tok is not None:
        check_tokenizers(s_tok, t_tok)
    return t_config, s_config, t_tok or s_tok


def _layer_counts(cfg: DistillConfig, t_config, s_config) -> tuple[int, int]:
    """(student layers, teacher layers) from the configs."""
    n_teacher = t_config.num_hidden_layers
    if s_config is not None:
        return s_config.num_hidden_layers, n_teacher
    return len(student_layer_indices(cfg.student_layers, n_teacher)), n_teacher


def train(cfg: DistillConfig, *, teacher: nn.Module | None = None, tokenizer=None, callbacks=()) -> dict:
    """Distil `cfg.teacher` into a student; returns a summary (paths, steps, final losses)."""
    if cfg.teacher is None and teacher is None:
        raise DistillConfigError("a teacher is needed: --teacher PATH (a save_pretrained directory or hub id)")
    if cfg.train_file is None:
        raise DistillConfigError("training data is needed: --train-file FILE (.txt, .jsonl or a saved dataset)")
    resume = _claim(cfg)  # the output directory is checked before anything is loaded or written
    # bad data fails before any model is loaded (a streamed corpus: its first record is read)
    texts = StreamedCorpus(cfg.train_file, cfg.text_column) if cfg.streaming else read_texts(cfg.train_file,
                                                                                              cfg.text_column)
    eval_texts = read_texts(cfg.eval_file, cfg.text_column) if cfg.eval_file else None
    # From the configs and the tokenizer, before any weights load: kinds, vocabularies, layers, objectives, data.
    t_config, s_config, tokenizer = check_sources(cfg, teacher, tokenizer)
    causal = is_causal_lm(t_config)
    tokenizer = setup_tokenizer(cfg, t_config, texts, tokenizer)
    weights = resolve_objectives(cfg.weights, causal, explicit=cfg.objectives is not None)
    offline = cfg.teacher_logits is not None  # stored teacher logits (teacher_logits.py): no live teacher
    if offline:
        from . import teacher_logits as tl

        if not causal:
            raise DistillConfigError("--teacher-logits needs a causal LM teacher: a masked LM's logits depend on the "
                                     "masks, which are drawn afresh at every step")
        tl.check_offline(weights, cfg)
        manifest = tl.Manifest.read(cfg.teacher_logits)
    objectives = Objectives(weights, causal, cfg.temperature, cfg.ce_scope, cfg.atkd_lambda, cfg.atkd_hard_fraction)
    n_student, n_teacher = _layer_counts(cfg, t_config, s_config)
    pairs = tuple(aligned_pairs(cfg.alignment, n_student, n_teacher)) if objectives.counterfactual else ()
    min_len, why = min_tokens(causal, cfg.span_fraction if pairs else None)
    max_length = min(max_tokens(t_config, cfg.max_length), max_tokens(s_config or t_config, cfg.max_length))
    if cfg.streaming:
        dataset = StreamedTexts(texts, tokenizer, max_length, min_len, cfg.shuffle_buffer, cfg.seed, why=why)
    else:
        dataset = TokenizedTexts(texts, tokenizer, max_length, min_len, source=cfg.train_file, why=why)
    _log_data(dataset)
    if offline:
        manifest.check(tokenizer, texts, max_length, cfg.text_column, cfg.train_file)
        dataset = tl.OfflineTeacherLogits(dataset, cfg.teacher_logits, manifest)
    per_step = cfg.batch_size * _world_size()
    usable = len(dataset.first(per_step) if cfg.streaming else dataset)  # a stream: a bounded peek
    if pairs and usable < per_step:
        raise DataError(f"{cfg.train_file}: {usable} usable examples, fewer than one batch ({per_step}); the "
                        "counterfactual objectives need full batches. Give more text or a smaller batch size.")
    # a batch of 1 has no other example to swap with: counterfactual runs drop a last batch that would be one
    # (a stream repeats endlessly: every batch is full)
    drop_last = bool(pairs) and not cfg.streaming and (_world_size() > 1 or len(dataset) % cfg.batch_size == 1)
    if not causal and tokenizer.mask_token_id is None:
        raise DistillConfigError("masked-LM distillation needs a tokenizer with a mask token")
    torch.manual_seed(cfg.seed)
    if teacher is None and not (offline and cfg.student):  # offline with --student: the teacher never loads
        teacher = load_lm(cfg.teacher)
    student = load_lm(cfg.student) if cfg.student else build_student(teacher, cfg.student_layers)
    if offline:  # the teacher only initialised the student: drop it before training (nothing else holds it)
        teacher = None
        return _train_offline(cfg, student, tokenizer, dataset, weights, n_teacher, eval_texts, callbacks, resume)
    if (num_layers(student), num_layers(teacher)) != (n_student, n_teacher):  # the configs' counts are the models'
        raise DistillConfigError(f"the models have {num_layers(student)} and {num_layers(teacher)} blocks, but their "
                                 f"configs say {n_student} and {n_teacher}")
    needs_cos = "cos" in weights or "diito_cos" in weights
    check_compatible(student, teacher, need_hidden=needs_cos, projection=cfg.cos_projection)
    projection = None
    hs, ht = student.config.hidden_size, teacher.config.hidden_size
    if needs_cos and cfg.cos_projection and hs != ht:
        projection = nn.Linear(hs, ht, bias=False)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    special = list(tokenizer.all_special_ids)
    recipe = BatchRecipe(
        causal=causal, seed=cfg.seed, pairs=pairs,
        token_weights=None if causal else token_weights(dataset.token_counts(vocab), special, cfg.mlm_smoothing),
        mask_token_id=tokenizer.mask_token_id, vocab_size=vocab, mlm_probability=cfg.mlm_probability,
        mask_split=cfg.mask_split, span_mode=cfg.span_mode, span_fraction=cfg.span_fraction)
    out = Path(cfg.output_dir)
    eval_dataset = TokenizedTexts(eval_texts, tokenizer, max_length, min_len, source=cfg.eval_file) \
        if eval_texts is not None and cfg.eval_steps else None
    args = training_arguments(cfg, drop_last, wrap_class=block_class(student))
    check_wrap_classes(cfg.fsdp_options, student)
    trainer = DistillTrainer(
        model=student, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
        data_collator=Collator(tokenizer.pad_token_id), method=LMDistillation(teacher, objectives, recipe, projection),
        teacher_dtype=teacher_dtype(cfg.teacher_dtype), warmup_ratio=cfg.warmup_ratio,
        place_frozen=lambda module, tr: place_teacher(module, tr, cfg.fsdp_options.teacher_offload),
        callbacks=[CSVLogCallback(out / "log.csv"), *callbacks])
    fsdp = fsdp_report(cfg.fsdp_options, trainer)  # warns when --fsdp was asked for but accelerate fell back
    train_loss = _run(trainer, cfg, resume)
    summary = {"output_dir": str(out), "global_step": trainer.state.global_step,
               "train_loss": train_loss, "objectives": weights, "causal": causal,
               "student_layers": num_layers(student), "teacher_layers": num_layers(teacher),
               "data": dataset.summary() if cfg.streaming else
               {"examples": len(dataset), "dropped_short": dataset.dropped, "truncated": dataset.truncated}}

    def save_projection(folder: Path) -> None:
        if projection is not None:
            torch.save(projection.state_dict(), folder / "cos_projection.pt")

    evaluate_student = (lambda: _evaluate(cfg, student, eval_texts, tokenizer, teacher)) if eval_texts is not None \
        else None
    return _finish(trainer, cfg, student, tokenizer, weights, summary, fsdp, evaluate_student, save_projection)


def _run(trainer: DistillTrainer, cfg: DistillConfig, resume) -> float:
    """Start the run in its output directory (rank 0), then train, or resume from `resume`; the training loss."""
    if not cfg.progress:
        trainer.remove_callback(PrinterCallback)
    if trainer.is_world_process_zero():
        begin_run(Path(cfg.output_dir), sources=_sources(cfg), overwrite=cfg.overwrite_output_dir,
                  options=cfg.to_dict())
    finished = _finished_state(Path(resume), trainer.args.max_steps) if resume else None
    if finished is not None:  # killed after its last step: restore it (the Trainer would take one step more)
        return _restore(trainer, Path(resume), finished)
    return trainer.train(resume_from_checkpoint=resume or None).training_loss


def _finish(trainer: DistillTrainer, cfg: DistillConfig, student: nn.Module, tokenizer, weights: dict, summary: dict,
            fsdp: dict | None, evaluate_student=None, save_extra=None) -> dict:
    """Save the student (a save_pretrained directory with its tokenizer, options, loss plot and summary.json),
    evaluated by `evaluate_student()` when given; `save_extra(folder)` adds a method's own files."""
    out = Path(cfg.output_dir)
    if fsdp is not None:
        summary["fsdp"] = fsdp
    enable_cache(student)
    trainer.save_model(str(out))  # every rank: under FSDP gathering the full state dict is collective; rank 0 writes
    if trainer.is_fsdp_enabled and evaluate_student is not None:  # a sharded model's forward is collective too
        summary["eval"] = evaluate_student()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        if save_extra is not None:
            save_extra(out)
        (out / "distill_config.json").write_text(json.dumps({**cfg.to_dict(), "resolved_objectives": weights},
                                                             indent=2, default=str))
        if cfg.plot and (out / "log.csv").is_file():
            summary["plot"] = str(plot_losses({"student": out / "log.csv"}, out / "loss_curve.png"))
        if evaluate_student is not None and not trainer.is_fsdp_enabled:
            summary["eval"] = evaluate_student()
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _evaluate(cfg: DistillConfig, student, eval_texts, tokenizer, teacher) -> dict:
    from .evaluate import EVAL_SEED, evaluate

    return evaluate(student, eval_texts, tokenizer, teacher=teacher, alignment=cfg.alignment,
                    max_length=cfg.max_length, seed=EVAL_SEED, batch_size=cfg.eval_batch_size,
                    span_fraction=cfg.span_fraction)


def _train_offline(cfg: DistillConfig, student: nn.Module, tokenizer, dataset, weights: dict, n_teacher: int,
                   eval_texts, callbacks, resume) -> dict:
    """`train` from stored teacher logits (teacher_logits.py): no teacher in memory, the student trains on
    `OfflineDistillation`; checkpoints, resume, logs and the saved student as in `train`."""
    import gc

    from .objectives.atkd import ATKDConfig
    from .teacher_logits import OfflineCollator, OfflineDistillation

    gc.collect()
    if student.get_output_embeddings().weight.shape[0] != dataset.manifest.vocab_size:
        raise DistillConfigError(f"the student's vocabulary ({student.get_output_embeddings().weight.shape[0]}) is "
                                 f"not the teacher logits' ({dataset.manifest.vocab_size})")
    out = Path(cfg.output_dir)
    method = OfflineDistillation(weights, cfg.temperature,
                                 ATKDConfig(lam=cfg.atkd_lambda, hard_fraction=cfg.atkd_hard_fraction))
    args = training_arguments(cfg, wrap_class=block_class(student))
    check_wrap_classes(cfg.fsdp_options, student)
    trainer = DistillTrainer(model=student, args=args, train_dataset=dataset,
                             data_collator=OfflineCollator(tokenizer.pad_token_id), method=method,
                             warmup_ratio=cfg.warmup_ratio, callbacks=[CSVLogCallback(out / "log.csv"), *callbacks])
    fsdp = fsdp_report(cfg.fsdp_options, trainer, live_teacher=False)
    train_loss = _run(trainer, cfg, resume)
    summary = {"output_dir": str(out), "global_step": trainer.state.global_step, "train_loss": train_loss,
               "objectives": weights, "causal": True, "teacher_logits": cfg.teacher_logits,
               "student_layers": num_layers(student), "teacher_layers": n_teacher,
               "data": {"examples": len(dataset), "dropped_short": dataset.data.dropped,
                        "truncated": dataset.data.truncated}}

    def evaluate_student() -> dict:
        from .evaluate import EVAL_SEED, evaluate

        return evaluate(student, eval_texts, tokenizer, max_length=cfg.max_length, seed=EVAL_SEED,
                        batch_size=cfg.eval_batch_size)

    return _finish(trainer, cfg, student, tokenizer, weights, summary, fsdp,
                   evaluate_student if eval_texts is not None else None)


def min_tokens(causal: bool, span_fraction: float | None) -> tuple[int, str]:
    """The fewest tokens an example needs, and why: 2 for a causal LM (one next-token target), and
    ceil(1 / span_fraction) for an interchange span of at least one position."""
    need, why = (2, "a causal LM needs a next token to predict") if causal else (1, "")
    if span_fraction is not None and math.ceil(1 / span_fraction) > need:
        need, why = math.ceil(1 / span_fraction), f"an interchange span of {span_fraction:g} x length needs that many"
    return need, why or "too short to train on"


def _log_data(dataset: TokenizedTexts) -> None:
    (logger.warning if dataset.dropped or dataset.truncated else logger.info)(dataset.report())


_LATEST = (True, "auto", "latest")


def _sources(cfg: DistillConfig) -> dict[str, str | None]:
    return {"teacher": cfg.teacher, "student": cfg.student, "teacher logits": cfg.teacher_logits}


def _claim(cfg: DistillConfig) -> str | None:
    """Check the output directory for this run; returns the checkpoint to resume from, or None.

    ``--resume latest`` continues the newest checkpoint in the output directory (a fresh run when there
    is none); ``--resume DIR`` continues that checkpoint. Either way the output directory may hold
    only the same run (same options); anything else needs --overwrite-output-dir or a new directory.
    """
    out = Path(cfg.output_dir)
    resume = cfg.resume
    if resume is not None and cfg.overwrite_output_dir:
        raise DistillConfigError("--resume continues the run in --output-dir and --overwrite-output-dir replaces "
                                 "it: give one of them")
    if resume in _LATEST:
        resume = get_last_checkpoint(str(out)) if out.is_dir() else None
    elif resume is not None:
        if not (Path(resume) / TRAINER_STATE_NAME).is_file():
            raise DistillConfigError(
                f"--resume {resume!r} is not a checkpoint directory (no {TRAINER_STATE_NAME} there); give a "
                f"checkpoint-N directory, or 'latest' for the newest one in --output-dir"
            )
        resume = str(resume)
    if cfg.resume in _LATEST:  # the newest checkpoint here, or a run killed before its first one
        same_run = resume is not None or (out / RUN_FILE).is_file()
    else:
        same_run = resume is not None and out.resolve() in Path(resume).resolve().parents
    claim_output_dir(out, sources=_sources(cfg), overwrite=cfg.overwrite_output_dir,
                     resuming=same_run and not cfg.overwrite_output_dir, options=cfg.to_dict())
    return resume


def _finished_state(checkpoint: Path, max_steps: int) -> TrainerState | None:
    """The checkpoint's state when it is at (or past) max_steps: the run was killed after its last step,
    before the final save. None otherwise."""
    path = checkpoint / TRAINER_STATE_NAME
    if max_steps <= 0 or not path.is_file():
        return None
    state = TrainerState.load_from_json(str(path))
    return state if state.global_step >= max_steps else None


def _restore(trainer: Trainer, checkpoint: Path, state: TrainerState) -> float:
    """Load a finished checkpoint's weights and state instead of resuming it.

    Returns the mean of the logged training losses (the Trainer's own average is not saved)."""
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    return sum(losses) / len(losses) if losses else float("nan")


def pretrain(model: nn.Module, tokenizer, texts: list[str], cfg: DistillConfig) -> dict:
    """Plain MLM/CLM training of `model` (e.g. a demo teacher) with the same Trainer and schedule."""
    causal = is_causal_lm(model)
    tokenizer = ensure_pad(tokenizer)
    min_len, why = min_tokens(causal, None)
    dataset = TokenizedTexts(texts, tokenizer, max_tokens(model, cfg.max_length), min_len, source="pretraining data",
                             why=why)
    _log_data(dataset)
    vocab = model.get_output_embeddings().weight.shape[0]
    recipe = BatchRecipe(
        causal=causal, seed=cfg.seed, pairs=(),
        token_weights=None if causal else token_weights(dataset.token_counts(vocab), tokenizer.all_special_ids,
                                                         cfg.mlm_smoothing),
        mask_token_id=tokenizer.mask_token_id, vocab_size=vocab, mlm_probability=cfg.mlm_probability,
        mask_split=cfg.mask_split)
    out = claim_output_dir(cfg.output_dir, sources={}, overwrite=cfg.overwrite_output_dir)
    begin_run(out, sources={}, overwrite=cfg.overwrite_output_dir)
    trainer = DistillTrainer(
        model=model, args=training_arguments(cfg), train_dataset=dataset,
        data_collator=Collator(tokenizer.pad_token_id),
        method=LMDistillation(None, Objectives({"clm" if causal else "mlm": 1.0}, causal), recipe),
        warmup_ratio=cfg.warmup_ratio, callbacks=[CSVLogCallback(out / "log.csv")])
    if not cfg.progress:
        trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    enable_cache(model)
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    return {"output_dir": str(out), "global_step": trainer.state.global_step, "train_loss": result.training_loss}
