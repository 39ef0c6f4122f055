"""Layer-stride alignments between a small (student) and a large (teacher) layered model.

Keys are student sites ``layers.{i}.output`` (the high level), images teacher sites
``layers.{j}.output``; indices are 0-based blocks. `full`, `middle` and `late` reproduce the
alignments of Causal Distillation for Language Models (Wu et al., NAACL 2022) as found in its
official code (frankaging/Causal-Distill, ``training_configs/*.nm``); see docs/alignment.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .alignment import Alignment
from .errors import AlignmentError

__all__ = ["from_layers", "full", "late", "layer_site", "middle", "strided"]


def layer_site(i: int, kind: str = "output") -> str:
    """The canonical site name of block `i`'s `kind` (``layers.{i}.output`` by default)."""
    return f"layers.{i}.{kind}"


def _count(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AlignmentError(f"{what} must be an int >= {minimum}, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise AlignmentError(f"{what} must be >= {minimum}, got {value}")
    return value


def _sizes(n_student, n_teacher, minimum: int = 1) -> tuple[int, int]:
    n_teacher = _count(n_teacher, "n_teacher", minimum)
    if isinstance(n_student, bool) or not isinstance(n_student, int) or not minimum <= n_student <= n_teacher:
        raise AlignmentError(
            f"n_student must be an int in {minimum}..{n_teacher} (at least {minimum} and at most the "
            f"teacher's {n_teacher} layers), got {n_student!r}"
        )
    return n_student, n_teacher


def from_layers(pairs: Mapping[int, int | Iterable[int]], n_student: int, n_teacher: int,
                kind: str = "output") -> Alignment:
    """Student block i -> teacher block(s) j, range-checked, on ``layers.{.}.{kind}`` sites."""
    n_student = _count(n_student, "n_student")
    n_teacher = _count(n_teacher, "n_teacher")
    out = {}
    for i, js in pairs.items():
        js = [js] if isinstance(js, int) else list(js)
        if not (isinstance(i, int) and 0 <= i < n_student):
            raise AlignmentError(f"student layer {i!r} out of range: valid 0..{n_student - 1}")
        bad = [j for j in js if not (isinstance(j, int) and 0 <= j < n_teacher)]
        if bad:
            raise AlignmentError(f"teacher layers {bad} (for student layer {i}) out of range: valid "
                                 f"0..{n_teacher - 1}")
        out[layer_site(i, kind)] = [layer_site(j, kind) for j in js]
    return Alignment(out)


def full(n_student: int, n_teacher: int, kind: str = "output") -> Alignment:
    """FULL: every student block gets a contiguous group of teacher blocks, in order, covering all.

    Group sizes are as equal as possible, the first ``n_teacher % n_student`` groups one larger
    (12 -> 6: [0,1]->0, ..., [10,11]->5; 12 -> 3: [0..3]->0, [4..7]->1, [8..11]->2; 12 -> 9, as in the
    official 9-layer config: [0,1]->0, [2,3]->1, [4,5]->2, 6->3, 7->4, ..., 11->8).
    """
    n_student, n_teacher = _sizes(n_student, n_teacher)
    size, extra = divmod(n_teacher, n_student)
    pairs, start = {}, 0
    for i in range(n_student):
        stop = start + size + (1 if i < extra else 0)
        pairs[i] = range(start, stop)
        start = stop
    return from_layers(pairs, n_student, n_teacher, kind)


def middle(n_student: int, n_teacher: int, kind: str = "output") -> Alignment:
    """MIDDLE: student block ``n_student // 2`` -> teacher ``n_teacher // 2`` (12->6: 6->3; 12->3: 6->1)."""
    n_student, n_teacher = _sizes(n_student, n_teacher)
    return from_layers({n_student // 2: n_teacher // 2}, n_student, n_teacher, kind)


def late(n_student: int, n_teacher: int, kind: str = "output") -> Alignment:
    """LATE: the third- and second-to-last blocks of each model, paired (two keys).

    Student ``n_student - 3`` -> teacher ``n_teacher - 3`` and ``n_student - 2`` -> ``n_teacher - 2``:
    12 -> 6: 9->3 and 10->4; 12 -> 3: 9->0 and 10->1 (the official configs; one pair is drawn per step).
    """
    n_student, n_teacher = _sizes(n_student, n_teacher, minimum=3)
    pairs = {n_student - 3: n_teacher - 3, n_student - 2: n_teacher - 2}
    return from_layers(pairs, n_student, n_teacher, kind)


def strided(n_student: int, n_teacher: int, stride: int | None = None, offset: int = 0,
            width: int = 1, kind: str = "output") -> Alignment:
    """Student block i -> teacher blocks ``offset + i*stride`` .. ``+ width - 1``.

    `stride` defaults to ``n_teacher // n_student``. ``strided(6, 12, stride=2, offset=1)`` maps
    i -> 2i+1 (each student block to the last teacher block of its FULL group);
    ``strided(n, m, width=m // n)`` equals ``full(n, m)`` when n divides m.
    """
    n_student, n_teacher = _sizes(n_student, n_teacher)
    stride = n_teacher // n_student if stride is None else _count(stride, "stride")
    offset = _count(offset, "offset", minimum=0)
    width = _count(width, "width")
    last = offset + (n_student - 1) * stride + width - 1
    if last >= n_teacher:
        raise AlignmentError(
            f"strided({n_student}, {n_teacher}, stride={stride}, offset={offset}, width={width}) reaches "
            f"teacher layer {last}; valid teacher layers are 0..{n_teacher - 1}, so offset + "
            f"{n_student - 1}*stride + width - 1 must be <= {n_teacher - 1}."
        )
    if width > stride and n_student > 1:
        raise AlignmentError(f"width ({width}) must not exceed stride ({stride}): groups would overlap")
    return from_layers({i: range(offset + i * stride, offset + i * stride + width) for i in range(n_student)},
                       n_student, n_teacher, kind)
