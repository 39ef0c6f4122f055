"""The ``ted`` command: ``python -m applications.distill ted {finetune,stage1,stage2,all} --help``.

finetune: plain task training (e.g. of the teacher, first). stage1: train the filters (and their task
heads) of one frozen model, saved to a .pt file. stage2: distil the teacher into the student (TED, or the KD / LWD baselines); the student is saved
with save_pretrained, without filters. all: stage 1 for the teacher, then the student, then stage 2.
Also runnable on its own: ``python -m applications.distill.ted.cli {finetune,stage1,stage2,all}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from interventions import InterventionError

from ..config import CLIParser, positive_float, positive_int
from ..errors import DataError, DistillConfigError
from ..objectives.ted import TEDConfig
from ..output_dir import begin_run, check_writable, claim_output_dir

DEFAULTS = TEDConfig()


def _loop_flags(p: argparse.ArgumentParser, prefix: str = "", steps: int = 200, lr: float = 1e-3, what: str = "") -> None:
    p.add_argument(f"--{prefix}max-steps", f"--{prefix}steps", dest=f"{prefix.replace('-', '_')}steps",
                   type=positive_int, default=steps,
                   help=f"optimizer steps{what}, >= 1 (default {steps}; alias --{prefix}steps)")
    p.add_argument(f"--{prefix}learning-rate", type=positive_float, default=lr, help=f"peak AdamW learning rate{what} (default {lr})")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file of this command's options (flags override it)")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help="replace a previous run's files in a non-empty output directory (or an existing filter "
                        "file); never the teacher's or student's directory")
    p.add_argument("--train-file", required=True,
                   help="classification: a tsv 'sentence<TAB>label' (header optional); LM: text, one example per line")
    p.add_argument("--per-device-train-batch-size", "--batch-size", dest="batch_size", type=positive_int, default=32,
                   help="examples per step (default 32; alias --batch-size)")
    p.add_argument("--max-length", type=positive_int, default=64,
                   help="tokens per example, longer ones truncated (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _trainer_flags(p)


def _trainer_flags(p: argparse.ArgumentParser) -> None:
    """What every stage gets from the one trainer (as `train` has them)."""
    p.add_argument("--gradient-accumulation-steps", "--grad-accum", dest="grad_accum", type=positive_int, default=1,
                   help="micro-batches per optimizer step (default 1; alias --grad-accum)")
    p.add_argument("--logging-steps", type=positive_int, default=1, help="log every N steps (default 1)")
    p.add_argument("--save-steps", type=positive_int,
                   help="checkpoint every N steps (default: no intermediate checkpoints)")
    p.add_argument("--eval-steps", type=positive_int, help="with --eval-file: evaluate the stage's losses every N steps")
    p.add_argument("--resume-from-checkpoint", "--resume", dest="resume",
                   help="continue from a checkpoint-N directory of this run (alias --resume)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    p.add_argument("--fp16", action="store_true", help="fp16 autocast (GPU; bf16 autocast on a CPU)")
    p.add_argument("--teacher-dtype", choices=("float32", "bfloat16", "float16", "auto"),
                   help="dtype of the frozen models (teacher, its filters; the model in stage 1)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False, help="show a progress bar")


def _filter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", choices=("linear", "mlp"), default="linear", help="filter type (default linear)")
    p.add_argument("--filter-width", type=positive_int, help="filter output width (default: the teacher's hidden size)")


def _stage2_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("ted", "kd", "lwd"), default="ted",
                   help="ted (filters from stage 1), kd (no filters), lwd (raw states, learned projection)")
    p.add_argument("--alpha-task", type=float, default=DEFAULTS.alpha_task, help="weight of the task loss")
    p.add_argument("--alpha-kl", type=float, default=DEFAULTS.alpha_kl, help="weight of T²·KL(teacher ‖ student)")
    p.add_argument("--alpha-mse", type=float, default=DEFAULTS.alpha_mse,
                   help=f"weight of the mean filtered-state MSE (default {DEFAULTS.alpha_mse})")
    p.add_argument("--temperature", type=positive_float, default=DEFAULTS.temperature, help="KL temperature T (default 2)")
    p.add_argument("--eval-file", help="held-out data (same format as --train-file): accuracy or perplexity")


def add_stages(parser: argparse.ArgumentParser) -> None:
    """The stage1 / stage2 / all subcommands under `parser`."""
    stages = parser.add_subparsers(dest="stage", required=True)
    ft = stages.add_parser("finetune", help="fine-tune a model on the task (e.g. the teacher, before stage 1)",
                           description="Plain task training of the whole model (classification: cross-entropy on "
                                       "the labels; LM: next-token loss); saved with save_pretrained.")
    ft.add_argument("--model", required=True, help="save_pretrained directory (with its tokenizer)")
    ft.add_argument("--output-dir", required=True, help="where the fine-tuned model is saved")
    ft.add_argument("--eval-file", help="held-out data (same format as --train-file): accuracy or perplexity")
    _common(ft)
    _loop_flags(ft, steps=500, lr=5e-4)
    s1 = stages.add_parser("stage1", help="train one frozen model's filters and task heads",
                           description="Stage 1: freeze the model; train a filter and a task head on every "
                                       "interval-th block on the task loss averaged over filters.")
    s1.add_argument("--model", required=True, help="save_pretrained directory (sequence classifier or causal LM, "
                                                   "with its tokenizer)")
    s1.add_argument("--output", required=True, help="the filter file to write (.pt)")
    s1.add_argument("--interval", type=positive_int, default=1, help="a filter on every interval-th block (default 1)")
    s1.add_argument("--teacher", help="the teacher, whose hidden size is the default filter width (for a student)")
    _filter_flags(s1)
    _common(s1)
    _loop_flags(s1)
    s2 = stages.add_parser("stage2", help="distil the teacher into the student (ted / kd / lwd)",
                           description="Stage 2: teacher and its filters frozen; the student and its filters "
                                       "train on L_task + a_KL*T^2*KL + a_MSE*MSE. The student is saved with "
                                       "save_pretrained, without filters or heads.")
    s2.add_argument("--teacher", required=True, help="the (fine-tuned) teacher directory")
    s2.add_argument("--student", required=True, help="the student to start from (save_pretrained directory)")
    s2.add_argument("--output-dir", required=True, help="where the distilled student is saved")
    s2.add_argument("--teacher-filters", help="the teacher's stage-1 filter file (mode ted)")
    s2.add_argument("--student-filters", help="the student's stage-1 filter file (mode ted)")
    s2.add_argument("--teacher-interval", type=positive_int, default=DEFAULTS.teacher_interval,
                    help="mode lwd: teacher blocks paired every interval-th")
    s2.add_argument("--student-interval", type=positive_int, default=DEFAULTS.student_interval,
                    help="mode lwd: student blocks paired every interval-th")
    _stage2_flags(s2)
    _common(s2)
    _loop_flags(s2)
    al = stages.add_parser("all", help="stage 1 (teacher, then student) and stage 2 in one command",
                           description="Writes OUTPUT_DIR/teacher_filters.pt, OUTPUT_DIR/student_filters.pt and "
                                       "the distilled student in OUTPUT_DIR/student.")
    al.add_argument("--teacher", required=True, help="the (fine-tuned) teacher directory")
    al.add_argument("--student", required=True, help="the student to start from (save_pretrained directory)")
    al.add_argument("--output-dir", required=True, help="filters and the distilled student go here")
    al.add_argument("--teacher-interval", type=positive_int, default=DEFAULTS.teacher_interval,
                    help=f"teacher filter interval (default {DEFAULTS.teacher_interval})")
    al.add_argument("--student-interval", type=positive_int, default=DEFAULTS.student_interval,
                    help=f"student filter interval (default {DEFAULTS.student_interval})")
    _filter_flags(al)
    _stage2_flags(al)
    _common(al)
    _loop_flags(al, "stage1-", 200, 1e-3, " of stage 1")
    _loop_flags(al)


def add_ted_parser(sub) -> None:
    """``ted`` under the main CLI's subcommands."""
    ted = sub.add_parser("ted", help="TED task-aware layer-wise distillation (finetune / stage1 / stage2 / all)",
                         description="TED (Liang et al., ICML 2023): task-aware filters, then layer-wise "
                                     "distillation through them. KD and LWD baselines via stage2 --mode.")
    add_stages(ted)


def _tokenizer(*paths):
    from ..models import load_tokenizer

    for p in paths:
        tok = load_tokenizer(p) if p else None
        if tok is not None:
            return tok
    raise DistillConfigError(f"no tokenizer saved with {', '.join(repr(p) for p in paths if p)}; "
                             "save one next to the model (tokenizer.save_pretrained)")


def _options(args, prefix: str = "", output_dir=None):
    from .stages import LoopOptions

    return LoopOptions(steps=getattr(args, f"{prefix}steps"), batch_size=args.batch_size,
                       learning_rate=getattr(args, f"{prefix}learning_rate"), max_length=args.max_length,
                       seed=args.seed, grad_accum=args.grad_accum, logging_steps=args.logging_steps,
                       save_steps=args.save_steps, eval_steps=args.eval_steps if getattr(args, "eval_file", None) else None,
                       output_dir=str(output_dir) if output_dir else None,
                       resume=args.resume if not prefix else None, bf16=args.bf16, fp16=args.fp16,
                       teacher_dtype=args.teacher_dtype, progress=args.progress)


def _check_filter_file(output, args) -> None:
    path = Path(output)
    if path.is_dir():
        raise DistillConfigError(f"--output {output!r} is a directory; give the filter file to write (.pt)")
    if path.exists() and not args.overwrite_output_dir:
        raise DistillConfigError(f"--output {output!r} exists; choose a new file or pass --overwrite-output-dir")
    check_writable(path.parent, "--output")


def _check_eval_file(args) -> None:
    """A missing --eval-file fails before any model is loaded (its content is read before training)."""
    if getattr(args, "eval_file", None) and not Path(args.eval_file).exists():
        raise DataError(f"--eval-file {args.eval_file!r} does not exist")


def _stage1_logs(output) -> Path:
    """Stage 1's logs (log.csv, TensorBoard, loss curve) go beside its filter file: f.pt -> f_logs/."""
    path = Path(output)
    return path.with_name(path.stem + "_logs")


def _stage1(model_dir, args, output, interval, width_from=None, prefix="") -> dict:
    from . import stages as tt

    _check_filter_file(output, args)
    model = tt.load_model(model_dir)
    task = tt.task_of(model)
    tok = _tokenizer(model_dir, width_from)
    opts = _options(args, prefix, _stage1_logs(output))
    data = tt.task_data(args.train_file, tok, task, opts.max_length, tt.num_outputs(model, task))
    width = args.filter_width or (tt.hidden_size(tt.load_model(width_from)) if width_from else None)
    logs = _stage1_logs(output)
    if logs.is_dir():  # the logs of this filter file's earlier (replaced or killed) run: never mixed with this one's
        import shutil

        shutil.rmtree(logs)
    filters, losses = tt.stage1(model, data, interval=interval, width=width, kind=args.filter, options=opts)
    path = tt.save_filters(filters, output, model)
    return {"filters": str(path), "layers": filters.layers, "task": task, "first_loss": losses[0],
            "last_loss": losses[-1]}


def _stage2(args, teacher_filters, student_filters, output_dir) -> dict:
    from . import stages as tt

    config = TEDConfig(mode=args.mode, teacher_interval=args.teacher_interval, student_interval=args.student_interval,
                       alpha_task=args.alpha_task, alpha_kl=args.alpha_kl, alpha_mse=args.alpha_mse,
                       temperature=args.temperature)
    sources = {"teacher": args.teacher, "student": args.student}
    out = claim_output_dir(output_dir, sources=sources, overwrite=args.overwrite_output_dir,
                           resuming=bool(args.resume))
    _check_eval_file(args)
    t_filters = s_filters = None
    if config.mode == "ted":  # missing files fail before any model is loaded
        t_filters = tt.load_filters(teacher_filters, "teacher")
        s_filters = tt.load_filters(student_filters, "student")
    teacher, student = tt.load_model(args.teacher), tt.load_model(args.student)
    task = tt.task_of(teacher)
    tok = _tokenizer(args.teacher, args.student)
    opts = _options(args, output_dir=output_dir)
    data = tt.task_data(args.train_file, tok, task, opts.max_length, tt.num_outputs(teacher, task))
    ev = tt.task_data(args.eval_file, tok, task, opts.max_length, tt.num_outputs(teacher, task)) \
        if args.eval_file else None  # bad eval data fails before training, not after it
    begin_run(out, sources=sources, overwrite=args.overwrite_output_dir)
    _, log = tt.stage2(config, teacher, student, data, opts, t_filters, s_filters, eval_data=ev)
    out = tt.export(student, output_dir, tok)
    summary = {"student": str(out), "mode": config.mode, "task": task, "steps": len(log),
               "first": log[0], "last": log[-1]}
    if ev is not None:
        summary["eval"] = tt.evaluate(student, ev)
    (Path(out) / "ted_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _finetune(args) -> dict:
    from . import stages as tt

    out = claim_output_dir(args.output_dir, sources={"model": args.model}, overwrite=args.overwrite_output_dir,
                           resuming=bool(args.resume))
    _check_eval_file(args)
    model = tt.load_model(args.model)
    task = tt.task_of(model)
    tok = _tokenizer(args.model)
    opts = _options(args, output_dir=args.output_dir)
    data = tt.task_data(args.train_file, tok, task, opts.max_length, tt.num_outputs(model, task))
    ev = tt.task_data(args.eval_file, tok, task, opts.max_length, tt.num_outputs(model, task)) \
        if args.eval_file else None  # bad eval data fails before training, not after it
    begin_run(out, sources={"model": args.model}, overwrite=args.overwrite_output_dir)
    losses = tt.finetune(model, data, opts, ev)
    out = tt.export(model, args.output_dir, tok)
    summary = {"model": str(out), "task": task, "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}
    if ev is not None:
        summary["eval"] = tt.evaluate(model, ev)
    return summary


def run_ted(args) -> dict:
    """Run the chosen stage; returns a JSON-able summary."""
    if args.stage == "finetune":
        return _finetune(args)
    if args.stage == "stage1":
        return _stage1(args.model, args, args.output, args.interval, args.teacher)
    if args.stage == "stage2":
        return _stage2(args, args.teacher_filters, args.student_filters, args.output_dir)
    sources = {"teacher": args.teacher, "student": args.student}
    out = claim_output_dir(args.output_dir, sources=sources, overwrite=args.overwrite_output_dir)
    _check_eval_file(args)
    begin_run(out, sources=sources, overwrite=args.overwrite_output_dir)
    args.overwrite_output_dir = False  # the directory is now this run's: its stages start from nothing
    summary = {}
    if args.mode == "ted":
        summary["teacher_stage1"] = _stage1(args.teacher, args, out / "teacher_filters.pt", args.teacher_interval,
                                            args.teacher, "stage1_")
        summary["student_stage1"] = _stage1(args.student, args, out / "student_filters.pt", args.student_interval,
                                            args.teacher, "stage1_")
    summary["stage2"] = _stage2(args, out / "teacher_filters.pt", out / "student_filters.pt", out / "student")
    return summary


def main(argv=None) -> int:
    from ..cli import with_config_file

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = CLIParser(prog="python -m applications.distill.ted.cli", description=__doc__.splitlines()[0])
    add_stages(parser)
    try:
        args = parser.parse_args(with_config_file(parser, argv))
        print(json.dumps(run_ted(args), default=str))
    except InterventionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
