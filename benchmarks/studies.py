"""What every study script shares: a resumable cache of finished pieces, seed statistics, the report.

A *piece* (a teacher, one student run, one evaluation) is a folder holding ``result.json`` once it
has finished; `cached` computes a piece only when that file is missing, under a `Lock`, so a killed
study resumes where it stopped and several study processes can share one cache. `write_section`
puts a study's generated tables into its own section of docs/results.md between markers, keeping
the hand-written reading around them.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path


class Busy(Exception):
    """Another live study process is working on this piece right now."""


class Lock:
    """An exclusive lock file (holding the pid) so several study processes can share one cache."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text() or 0)
                    os.kill(pid, 0)  # alive: someone else is on it
                    if pid != os.getpid():
                        raise Busy(str(self.path))
                except (ValueError, ProcessLookupError):
                    self.path.unlink(missing_ok=True)  # a dead holder: take over
                    continue
                except PermissionError as e:
                    raise Busy(str(self.path)) from e
                return self
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise Busy(str(self.path))

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        return False


def cached(folder: Path, compute: Callable[[Path], dict]) -> tuple[dict, bool]:
    """`folder/result.json`, computing it with `compute(folder)` when missing. Returns (result, reused).

    `compute` may leave partial state in `folder` (checkpoints) that a later call resumes from; the
    result file is written last, atomically, so a piece is either finished or redone."""
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text()), True
    with Lock(folder.parent / f"{folder.name}.lock"):
        if done.is_file():  # finished by another process while we waited
            return json.loads(done.read_text()), True
        folder.mkdir(parents=True, exist_ok=True)
        result = compute(folder)
        tmp = folder / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(done)
        return result, False


def mean_std(values: list[float], fmt: str = ".2f") -> str:
    """'mean ± sample std' of the values ('—' for none; '(1 seed)' for one)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:{fmt}} (1 seed)"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt.replace('+', '')}}"


def paired(runs: dict, base: dict, key: str | None = None) -> list[float]:
    """runs[s] - base[s] for the seeds both have (the seeds share data order and initialisation).

    Values are numbers, or dicts read at `key`."""
    pick = (lambda r: r) if key is None else (lambda r: r[key])
    return [pick(runs[s]) - pick(base[s]) for s in sorted(runs) if s in base]


def markers(name: str) -> tuple[str, str]:
    """The start/end comments around a study's generated block."""
    return f"<!-- {name}: generated, start -->", f"<!-- {name}: generated, end -->"


def write_section(results_md: Path, heading: str, generated: str, name: str) -> None:
    """Put `generated` into the section `heading` of results_md, between `name`'s markers.

    Text outside the markers (other sections, the hand-written reading of this one) is kept as it is;
    a missing section is appended at the end."""
    start, end = markers(name)
    text = results_md.read_text(encoding="utf-8") if results_md.is_file() else ""
    block = f"{start}\n{generated.strip()}\n{end}"
    if heading not in text:
        text = (text.rstrip("\n") + "\n\n" if text else "") + f"{heading}\n\n{block}\n"
    else:
        head = text.index(heading)
        nxt = text.find("\n## ", head + len(heading))
        section_end = len(text) if nxt < 0 else nxt
        a, b = text.find(start, head, section_end), text.find(end, head, section_end)
        if a >= 0 and b >= 0:
            text = text[:a] + block + text[b + len(end):]
        else:
            line_end = head + len(heading)
            text = text[:line_end] + "\n\n" + block + text[line_end:]
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(text, encoding="utf-8")


def unigram_perplexity(tokenizer, train_texts: list[str], eval_texts: list[str], max_length: int) -> float:
    """Held-out perplexity of the training unigram distribution (add-one), special tokens left out.

    The reference for masked-LM perplexities: a model that ignores context cannot beat it by much."""
    import math

    import torch

    special = set(tokenizer.all_special_ids)

    def ids(texts):
        enc = tokenizer([t for t in texts if t.strip()], truncation=True, max_length=max_length)["input_ids"]
        return torch.tensor([i for x in enc for i in x if i not in special])

    counts = torch.bincount(ids(train_texts), minlength=len(tokenizer)).double() + 1
    return math.exp(float(-(counts / counts.sum())[ids(eval_texts)].log().mean()))
