"""Output-directory safety: a run never overwrites its teacher or student, nor mixes with another run.

`claim_output_dir` is called before any model is loaded. It refuses an output directory that is
the source of a model the run reads (always), and a non-empty one unless the run continues the
same run (`--resume`) or `--overwrite-output-dir` is given. Overwriting removes the previous run's
artefacts (checkpoints, logs, plots, summaries), never anything else. `RUN_FILE` records the
options of the run that owns the directory, so a resume into another run's directory is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from .errors import DistillConfigError

#: The options of the run that owns an output directory (written when the run starts).
RUN_FILE = "distill_config.json"
#: What a run writes besides the saved model files (which the next save overwrites anyway).
ARTEFACTS = ("checkpoint-*", "runs", "log.csv", "loss_curve.png", "summary.json", RUN_FILE, "cos_projection.pt",
             "ted_summary.json", "teacher_filters.pt", "student_filters.pt", "student",
             "teacher-logits-*.safetensors", "teacher_logits.json")
#: Options that steer a run without changing what it trains: they may differ on a resume.
RUN_CONTROL = frozenset({"output_dir", "resume", "overwrite_output_dir", "progress", "plot", "eval_file",
                         "logging_steps", "save_steps", "max_steps", "num_epochs", "eval_batch_size"})


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def refuse_sources(output_dir: str | Path, sources: Mapping[str, str | None], flag: str = "--output-dir") -> None:
    """Raise when `output_dir` is the directory of a model the run reads (its teacher, its student)."""
    out = _resolved(output_dir)
    for role, source in sources.items():
        if source and Path(source).expanduser().exists() and _resolved(source) == out:
            raise DistillConfigError(
                f"{flag} '{output_dir}' is the {role}'s directory: the run would overwrite the {role}. "
                f"Choose another {flag}."
            )


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def _artefacts(out: Path, sources: Mapping[str, str | None]) -> list[Path]:
    """A previous run's artefacts in `out`; raises if one of them holds a model the run reads."""
    doomed = [path for pattern in ARTEFACTS for path in out.glob(pattern)]
    for role, source in sources.items():
        if source and Path(source).expanduser().exists():
            src = _resolved(source)
            hit = next((p for p in doomed if src == p.resolve() or p.resolve() in src.parents), None)
            if hit is not None:
                raise DistillConfigError(
                    f"--overwrite-output-dir would delete {hit}, which holds the {role} ('{source}'). Move the "
                    "model out of the output directory or choose another --output-dir."
                )
    return doomed


def _run_options(options: Mapping) -> dict:
    return {k: v for k, v in options.items() if k not in RUN_CONTROL}


def _check_same_run(out: Path, options: Mapping) -> None:
    path = out / RUN_FILE
    if not path.is_file():
        return  # a directory from before this file existed, or a run killed before it started: nothing to compare
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DistillConfigError(f"cannot read {path} to check that the resumed run is the same run: {e}") from e
    ours = json.loads(json.dumps(_run_options(options), default=str))  # tuples -> lists, as on disk
    theirs = _run_options({k: v for k, v in recorded.items() if k in ours})
    diffs = {k: (theirs[k], ours[k]) for k in ours if k in theirs and theirs[k] != ours[k]}
    if diffs:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diffs.items()))
        raise DistillConfigError(
            f"--resume-from-checkpoint into {out}: the run there was started with other options ({shown}). Resume with the same "
            "options, or start a new run in another --output-dir (or pass --overwrite-output-dir to replace it)."
        )


def check_writable(path: str | Path, flag: str = "--output-dir") -> None:
    """Raise unless a directory can be created (or written) at `path`: its nearest existing ancestor is a
    writable directory. Nothing is created; the check runs before training, not after it."""
    p = _resolved(path)
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DistillConfigError(f"{flag} {str(path)!r} cannot be created: {str(ancestor)!r} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DistillConfigError(f"{flag} {str(path)!r} is not writable (no write permission on {str(ancestor)!r})")


def claim_output_dir(output_dir: str | Path, *, sources: Mapping[str, str | None], overwrite: bool = False,
                     resuming: bool = False, options: Mapping | None = None, flag: str = "--output-dir") -> Path:
    """Check `output_dir` for a new run and return it; nothing is written (see `begin_run`), so a run
    refused later, by any other check, leaves the directory as it was.

    `sources`: role -> path of every model the run reads (never written to). `resuming`: the run
    continues from a checkpoint in this directory, so it may hold that run (whose recorded options
    must then match `options`, if given).
    """
    refuse_sources(output_dir, sources, flag)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DistillConfigError(f"{flag} '{output_dir}' is a file, not a directory")
    check_writable(out, flag)
    entries = _entries(out)
    if entries and overwrite:
        _artefacts(out, sources)
    elif entries and resuming:
        if options is not None:
            _check_same_run(out, options)
    elif entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise DistillConfigError(
            f"{flag} '{output_dir}' is not empty ({shown}): another run's files would mix with this one's. "
            "Choose a new directory, continue that run with --resume-from-checkpoint latest, or replace it with "
            "--overwrite-output-dir."
        )
    return out


def begin_run(out: Path, *, sources: Mapping[str, str | None], overwrite: bool = False,
              options: Mapping | None = None) -> None:
    """Just before training: with `overwrite`, remove the previous run's artefacts; record `options`
    as the options of the run that now owns `out` (checked by a later resume)."""
    if overwrite and out.is_dir():
        for path in _artefacts(out, sources):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if options is not None:
        (out / RUN_FILE).write_text(json.dumps(dict(options), indent=2, default=str))
