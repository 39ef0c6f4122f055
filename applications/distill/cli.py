"""The command line: ``python -m applications.distill {train,eval,demo} --help``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from interventions import InterventionError

from .config import ALIGNMENTS, FLAGS, OBJECTIVES, RECIPES, SPAN_MODES, CLIParser, DistillConfig, positive_int
from .errors import DistillConfigError
from .evaluate import EVAL_SEED
from .ted.cli import add_ted_parser, run_ted

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
    "max_steps": "optimizer steps, >= 1 (when given, --num-train-epochs is ignored)",
    "num_epochs": "epochs (> 0; fractions allowed) when --max-steps is not given",
    "save_steps": "checkpoint every N >= 1 steps", "logging_steps": "log every N >= 1 steps", "seed": "random seed",
    "eval_batch_size": "evaluation batch size (the final --eval-file evaluation; `eval` uses the same default)",
    "resume": "resume from a checkpoint directory, or 'latest' in --output-dir (the same run only)",
    "overwrite_output_dir": "replace the previous run's checkpoints, logs and summaries in a non-empty --output-dir "
                            "(never the teacher's or student's directory)",
    "vocab_size": "vocabulary of a tokenizer trained when the teacher has none", "text_column": "jsonl/dataset text field",
    "progress": "show a progress bar", "plot": "write loss_curve.png at the end",
    "streaming": "stream --train-file through `datasets` (constant memory; needs --max-steps; the corpus repeats "
                 "until then); not with --teacher-logits",
    "shuffle_buffer": "with --streaming: shuffle within a buffer of N examples, reshuffled each pass (0: file order)",
    "bf16": "bf16 autocast (CPU or GPU)", "fp16": "fp16 autocast with loss scaling (GPU; bf16 autocast on a CPU)",
    "teacher_dtype": "the frozen teacher's dtype: float32, bfloat16 or float16 (default: as loaded)",
    "teacher_logits": "train from the teacher logits the teacher-logits command wrote there (objectives ce, clm, "
                      "atkd only; the teacher loads at most once, to initialise the student, or never with --student)",
    "eval_steps": "with --eval-file: also evaluate the training losses on it every N steps (logged as eval_loss*)",
    "fsdp": "FSDP2 through the Trainer (TrainingArguments.fsdp): 'full_shard auto_wrap', 'shard_grad_op', "
            "'full_shard offload auto_wrap', or bare --fsdp (settings from --fsdp-config); GPUs only (docs/distill.md)",
    "fsdp_config": "TrainingArguments.fsdp_config: a JSON file or inline JSON, e.g. '{\"activation_checkpointing\": "
                   "true}' (default wrap class: the student's transformer block)",
    "teacher_offload": "cpu: keep the teacher's weights in CPU memory, copied to the device module by module "
                       "(accelerate cpu_offload); default none (under FSDP the teacher is sharded)",
}


#: Earlier spellings kept as aliases of the TrainingArguments-style flags (docs/distill.md).
OLD_SPELLINGS = {"num_epochs": "--num-epochs", "batch_size": "--batch-size", "grad_accum": "--grad-accum",
                 "resume": "--resume", "max_steps": "--steps", "output_dir": "--output",
                 "eval_batch_size": "--eval-batch-size"}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per DistillConfig field (TrainingArguments' spelling first, older ones as aliases).

    Values stay text (None when unset, so a --config file can supply them): DistillConfig converts and
    checks flags and config-file values alike."""
    parser.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    for f in fields(DistillConfig):
        default = f.default if f.default is not MISSING else None
        flags = [FLAGS.get(f.name, "--" + f.name.replace("_", "-"))]
        if f.name in OLD_SPELLINGS:
            flags.append(OLD_SPELLINGS[f.name])
        shown = f" (default: {default})" if default not in (None, "") else ""
        alias = f"; alias {', '.join(flags[1:])}" if len(flags) > 1 else ""
        kwargs = {"dest": f.name, "default": None, "help": HELP.get(f.name, f.name) + shown + alias}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        if f.name == "teacher_dtype":
            kwargs["choices"] = ("float32", "bfloat16", "float16", "auto")
        if f.name == "fsdp":  # as TrainingArguments: a bare --fsdp turns it on
            kwargs.update(nargs="?", const="true")
        parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = CLIParser(
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
    ev.add_argument("--config", help="YAML or JSON file of this command's options (flags override it)")
    ev.add_argument("--model", required=True, help="save_pretrained directory of the model to evaluate")
    ev.add_argument("--eval-file", required=True, help="held-out text (.txt, .jsonl or a saved dataset)")
    ev.add_argument("--teacher", help="teacher (directory or hub id) for IIA")
    ev.add_argument("--alignment", default="full", choices=ALIGNMENTS, help="alignment for IIA (default full)")
    ev.add_argument("--max-length", type=positive_int, default=128, help="tokens per example (default 128)")
    ev.add_argument("--per-device-eval-batch-size", "--batch-size", dest="batch_size", type=positive_int,
                    default=16, help="examples per batch (default 16, as in train; alias --batch-size)")
    ev.add_argument("--eval-seed", "--seed", dest="eval_seed", type=int, default=EVAL_SEED,
                    help=f"seed of the evaluation masks and spans (default {EVAL_SEED}, the seed every training "
                         "run evaluates with; alias --seed)")
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
    demo.add_argument("--config", help="YAML or JSON file of this command's options (flags override it)")
    add_ted_parser(sub)
    tl = sub.add_parser("teacher-logits", help="store a causal teacher's top-k logits over a corpus, once",
                        description="Run the teacher once over --train-file and write, per token, its top-k logits "
                                    "and indices, the log-sum-exp and the next token's logit (safetensors shards "
                                    "and a JSON manifest) for `train --teacher-logits DIR`.")
    tl.add_argument("--config", help="YAML or JSON file of this command's options (flags override it)")
    tl.add_argument("--teacher", required=True, help="causal LM teacher: a save_pretrained directory or a hub id")
    tl.add_argument("--train-file", required=True, help=HELP["train_file"])
    tl.add_argument("--top-k", type=positive_int, required=True, help="logits kept per token (<= vocabulary)")
    tl.add_argument("--output-dir", required=True, help="where the shards and teacher_logits.json go")
    tl.add_argument("--max-length", type=positive_int, default=128, help="tokens per example (default 128, as train)")
    tl.add_argument("--batch-size", type=positive_int, default=16, help="examples per teacher forward (default 16)")
    tl.add_argument("--shard-tokens", type=positive_int, default=1_000_000, help="tokens per shard (default 1e6)")
    tl.add_argument("--text-column", default="text")
    tl.add_argument("--overwrite-output-dir", action="store_true", help="replace earlier teacher logits there")
    return parser


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, int]:
    """The (sub)parser that the command words at the start of `argv` select, and how many words they are."""
    depth = 0
    while depth < len(argv):
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or argv[depth] not in sub.choices:
            break
        parser, depth = sub.choices[argv[depth]], depth + 1
    return parser, depth


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def with_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with a --config file's options inserted as flags after the command words (so that flags given
    on the command line override them): the file's values are parsed and checked exactly as flags are.

    `train` reads its file through DistillConfig.from_sources instead (the same checks, field by field)."""
    path = _config_path(argv)
    command, depth = _subparser(parser, argv)
    if path is None or (argv and argv[0] == "train"):
        return argv
    from .config import load_config_file

    options = {s.lstrip("-").replace("-", "_"): a for a in command._actions for s in a.option_strings}
    flags: list[str] = []
    for key, value in load_config_file(path).items():
        action = options.get(key)
        if action is None or key in ("config", "help"):
            valid = sorted({k for k in options if k not in ("config", "help")})
            raise DistillConfigError(f"config file {path!r}: unknown option {key!r} for `{command.prog}`; valid "
                                     f"options: {', '.join(valid)}")
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch: true turns it on; false leaves (or turns) it off
            if not isinstance(value, bool):
                raise DistillConfigError(f"config file {path!r}: {key} must be true or false, got {value!r}")
            if value:
                flags.append(flag)
            elif isinstance(action, argparse.BooleanOptionalAction):
                flags.append("--no-" + flag[2:])
            continue
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise DistillConfigError(f"config file {path!r}: {key} must be a single value, got {value!r}")
        flags += [flag, str(value)]
    return argv[:depth] + flags + argv[depth:]


def run_train(args) -> dict:
    from .run import train

    values = {f.name: getattr(args, f.name) for f in fields(DistillConfig)}
    cfg = DistillConfig.from_sources(args.config, **values)
    return train(cfg)


def run_eval(args) -> dict:
    from .data import read_texts
    from .evaluate import evaluate
    from .models import ensure_pad, load_config, load_lm, load_tokenizer
    from .student import check_configs, check_tokenizers

    texts = read_texts(args.eval_file, args.text_column)
    config = load_config(args.model)
    own = load_tokenizer(args.model)
    t_tok = load_tokenizer(args.teacher) if args.teacher else None
    if args.teacher:  # configs and tokenizers before any weights load
        check_configs(config, load_config(args.teacher))
        if own is not None and t_tok is not None:
            check_tokenizers(own, t_tok)
    tokenizer = own or t_tok
    if tokenizer is None:
        raise DistillConfigError(f"no tokenizer saved with {args.model!r} (or the teacher)")
    model = load_lm(args.model)
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
                    max_length=args.max_length, seed=args.eval_seed, batch_size=args.batch_size,
                    span_fraction=args.span_fraction)


def run_demo(args) -> dict:
    from .demo import QUICK, DemoSize
    from .demo import run_demo as demo

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return demo(args.output_dir, QUICK if args.quick else DemoSize(), seed=args.seed, progress=args.progress)


def main(argv=None) -> int:
    """Run one command; every error of the user's making is one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(with_config_file(parser, argv))
        if args.command == "train":
            result = run_train(args)
            print(json.dumps(result, default=str))
        elif args.command == "ted":
            print(json.dumps(run_ted(args), default=str))
        elif args.command == "teacher-logits":
            from .teacher_logits import write_teacher_logits

            print(json.dumps(write_teacher_logits(
                args.teacher, args.train_file, args.top_k, args.output_dir, max_length=args.max_length,
                batch_size=args.batch_size, text_column=args.text_column, shard_tokens=args.shard_tokens,
                overwrite=args.overwrite_output_dir)))
        elif args.command == "eval":
            print(json.dumps(run_eval(args)))
        else:
            run_demo(args)
    except InterventionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
