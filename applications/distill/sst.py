"""Reading a labelled tsv (SST-2 style: ``sentence<TAB>label``, an optional header line) for classification."""

from __future__ import annotations

from pathlib import Path

from .errors import DataError


def read_labelled(path: str, num_labels: int | None = None) -> tuple[list[str], list[int]]:
    """(sentences, integer labels) of a tsv file; with `num_labels`, every label must be in 0..num_labels-1."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"labelled data file {path!r} does not exist (expected a tsv: sentence<TAB>label)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path!r} as UTF-8 text: {e}") from e
    texts, labels = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cols = line.rstrip("\n").split("\t")
        if n == 1 and cols[-1].strip().lower() == "label":
            continue  # the header
        if len(cols) < 2 or not cols[0].strip():
            raise DataError(f"{path}:{n}: expected 'sentence<TAB>label', got {line[:60]!r}")
        try:
            label = int(cols[-1].strip())
        except ValueError as e:
            raise DataError(f"{path}:{n}: label {cols[-1].strip()!r} is not an integer class id") from e
        if label < 0 or (num_labels is not None and label >= num_labels):
            valid = f"0..{num_labels - 1}" if num_labels is not None else "non-negative integers"
            raise DataError(f"{path}:{n}: label {label} outside the model's classes (valid: {valid})")
        texts.append("\t".join(cols[:-1]).strip())
        labels.append(label)
    if not texts:
        raise DataError(f"labelled data file {path!r} holds no examples")
    return texts, labels
