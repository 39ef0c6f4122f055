"""The command line: ``python -m applications.distill {train,eval,demo} --help``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from interventions import InterventionError

from .config import ALIGNMENTS, OBJECTIVES, RECIPES, SPAN_MODES, DistillConfig
from .ted_cli import add_ted_parser, run_ted

HELP = {
    "teacher": "teacher: a save_pretrained directory or a hub id (masked or causal LM)",
    "train_file": "training text: .txt (a line per example), .jsonl (a 'text' field) or a saved datasets dir",
    "eval_file": "held-out text, evaluated (perplexity, IIA) at the end",
    "output_dir": "where checkpoints, logs (TensorBoard, log.csv), the plot and the student go",
    "student": "start from this student instead of copying teacher layers",
    "student_layers": "number of student layers (DistilBERT rule [0,2,4,7,9,11][:n]) or a list '0,2,4'",
    "objectives": f"comma list of {', '.join(OBJECTIVES)}, each optionally =weight (default: the recipe's)",
    "recipe": f"weights when --objectives is absent: {', '.join(RECIPES)} (diito: 0.25 each of ce, mlm, cos, "
              "diito; standard: 1/3 each of ce, mlm, cos)",
    "temperature": "softmax temperature T of ce and diito (times T^2)",
    "atkd_lambda": "ATKD (objectives atkd, atkd_reverse): weight lambda of the easy tokens' DKD; hard tokens get "
                   "1 - lambda (docs/atkd.md)",
    "atkd_hard_fraction": "ATKD: share of valid tokens, by highest teacher uncertainty 1 - p_target, that are hard",
    "ce_scope": "ce over 'all' non-pad tokens (the paper) or 'masked' ones only",
    "alignment": f"student->teacher layer alignment: {', '.join(ALIGNMENTS)}",
    "span_mode": f"interchange positions: {', '.join(SPAN_MODES)}",
    "span_fraction": "span length = int(fraction * min(len_base, len_source))",
    "mlm_probability": "share of tokens masked", "mask_split": "[MASK]/keep/random shares, e.g. 0.8,0.1,0.1",
    "mlm_smoothing": "masking probability ∝ count^-smoothing", "cos_projection": "learn a linear map when hidden sizes differ",
    "max_length": "tokens per example (longer ones are truncated)", "batch_size": "examples per device per micro-batch",
    "grad_accum": "micro-batches per optimizer step", "learning_rate": "peak AdamW learning rate",
    "betas": "AdamW betas, e.g. 0.9,0.98", "adam_epsilon": "AdamW epsilon", "weight_decay": "AdamW weight decay",
    "warmup_ratio": "share of steps of linear warmup (then linear decay)", "max_grad_norm": "gradient clipping norm",
    "max_steps": "optimizer steps (overrides --num-epochs when > 0)", "num_epochs": "epochs when --max-steps <= 0",
    "save_steps": "checkpoint every N steps", "logging_steps": "log every N steps", "seed": "random seed",
    "resume": "resume from a checkpoint directory, or 'latest' in --output-dir (the same run only)",
    "overwrite_output_dir": "replace the previous run's checkpoints, logs and summaries in a non-empty --output-dir "
                            "(never the teacher's or student's directory)",
    "vocab_size": "vocabulary of a tokenizer trained when the teacher has none", "text_column": "jsonl/dataset text field",
    "progress": "show a progress bar", "plot": "write loss_curve.png at the end",
    "bf16": "bf16 autocast (CPU or GPU)", "fp16": "fp16 autocast with loss scaling (GPU; bf16 autocast on a CPU)",
    "teacher_dtype": "the frozen teacher's dtype: float32, bfloat16 or float16 (default: as loaded)",
    "eval_steps": "with --eval-file: also evaluate the training losses on it every N steps (logged as eval_loss*)",
}


def _floats(text: str) -> tuple:
    return tuple(float(x) for x in text.split(","))


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per DistillConfig field; unset flags stay None so a --config file can supply them."""
    parser.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    for f in fields(DistillConfig):
        default = f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        shown = f" (default: {default})" if default not in (None, "") else ""
        kwargs = {"dest": f.name, "default": None, "help": HELP.get(f.name, f.name) + shown}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs["type"] = _floats
        elif isinstance(default, (int, float)) and f.name != "student_layers":
            kwargs["type"] = type(default)
        elif f.name == "eval_steps":
            kwargs["type"] = int
        if f.name == "teacher_dtype":
            kwargs["choices"] = ("float32", "bfloat16", "float16", "auto")
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m applications.distill",
        description="Causal distillation (DIITO, Wu et al. 2022), standard KD and ATKD (objectives atkd, "
                    "atkd_reverse) of Hugging Face LMs; TED task-aware distillation (the ted command).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="distil a teacher into a student",
                           description="Distil a teacher into a smaller student (HF Trainer; torchrun for DDP).")
    add_config_options(train)
    ev = sub.add_parser("eval", help="perplexity (and IIA against a teacher) of a model, as JSON",
                        description="Print one JSON object: perplexity, and with --teacher the teacher's "
                                    "perplexity and the student-teacher IIA.")
    ev.add_argument("--model", required=True, help="save_pretrained directory of the model to evaluate")
    ev.add_argument("--eval-file", required=True, help="held-out text (.txt, .jsonl or a saved dataset)")
    ev.add_argument("--teacher", help="teacher (directory or hub id) for IIA")
    ev.add_argument("--alignment", default="full", choices=ALIGNMENTS, help="alignment for IIA (default full)")
    ev.add_argument("--max-length", type=int, default=128)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--span-fraction", type=float, default=0.3)
    ev.add_argument("--text-column", default="text")
    demo = sub.add_parser("demo", help="the embedded demo: teacher, standard and DIITO students, a table",
                          description="Train a small teacher on a generated grammar corpus, distil a standard and "
                                      "a DIITO student with the same budget, print perplexity and IIA.")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a much smaller run (seconds; a smoke test)")
    demo.add_argument("--progress", action="store_true", help="show progress bars")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (default 1: robust on a busy machine; 0 = torch's default)")
    add_ted_parser(sub)
    return parser


def run_train(args) -> dict:
    from .run import train

    values = {f.name: getattr(args, f.name) for f in fields(DistillConfig)}
    cfg = DistillConfig.from_sources(args.config, **values)
    return train(cfg)


def run_eval(args) -> dict:
    from .data import read_texts
    from .errors import DistillConfigError
    from .evaluate import evaluate
    from .models import ensure_pad, load_lm, load_tokenizer

    texts = read_texts(args.eval_file, args.text_column)
    model = load_lm(args.model)
    tokenizer = load_tokenizer(args.model) or (load_tokenizer(args.teacher) if args.teacher else None)
    if tokenizer is None:
        raise DistillConfigError(f"no tokenizer saved with {args.model!r} (or the teacher)")
    teacher = load_lm(args.teacher) if args.teacher else None
    if teacher is not None:
        from .student import check_compatible

        check_compatible(model, teacher)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # evaluate where the batches are built: the model's device
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    return evaluate(model, texts, ensure_pad(tokenizer), teacher=teacher, alignment=args.alignment,
                    max_length=args.max_length, seed=args.seed, batch_size=args.batch_size,
                    span_fraction=args.span_fraction)


def run_demo(args) -> dict:
    from .demo import QUICK, DemoSize
    from .demo import run_demo as demo

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return demo(args.output_dir, QUICK if args.quick else DemoSize(), seed=args.seed, progress=args.progress)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            result = run_train(args)
            print(json.dumps(result, default=str))
        elif args.command == "ted":
            print(json.dumps(run_ted(args), default=str))
        elif args.command == "eval":
            print(json.dumps(run_eval(args)))
        else:
            run_demo(args)
    except InterventionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
