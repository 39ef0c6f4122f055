"""Build a student from a teacher: same architecture and vocabulary, fewer blocks, copied weights.

Embeddings, the output head and final norms are copied as they are; student block i is a copy of
teacher block ``layers[i]`` (DistilBERT's rule [0, 2, 4, 7, 9, 11][:n] by default).
"""

from __future__ import annotations

import copy
import re

from torch import nn

from interventions import SiteGraph, UnsupportedModelError

from .config import student_layer_indices
from .errors import IncompatibleModelsError


def layers_path(model: nn.Module) -> str:
    """Dotted path of the model's block list (from the toolkit's family tables)."""
    graph = SiteGraph.from_model(model)
    if not graph.num_layers or not graph.layers_path:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no recognised block list; supported families: BERT, RoBERTa, "
            "DistilBERT, GPT-2, Llama, Qwen2 (and others with a family table)."
        )
    return graph.layers_path


def num_layers(model: nn.Module) -> int:
    return SiteGraph.from_model(model).num_layers


def student_config(teacher_config, layers: list[int]):
    """The teacher's config with len(layers) blocks (per-layer lists such as Qwen2's layer_types sliced)."""
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(layers)  # attribute maps cover n_layer (GPT-2) and n_layers (DistilBERT)
    per_layer = getattr(config, "layer_types", None)
    if isinstance(per_layer, (list, tuple)) and len(per_layer) == getattr(teacher_config, "num_hidden_layers", -1):
        config.layer_types = [per_layer[i] for i in layers]
    if hasattr(config, "max_window_layers"):
        config.max_window_layers = min(config.max_window_layers, len(layers))
    return config


def build_student(teacher: nn.Module, layers=6) -> nn.Module:
    """A student of the teacher's class with the chosen teacher blocks (a count or a list of indices)."""
    path = layers_path(teacher)
    chosen = student_layer_indices(layers, num_layers(teacher))
    student = type(teacher)(student_config(teacher.config, chosen))
    pattern = re.compile(re.escape(path) + r"\.(\d+)\.(.*)")
    rename = {j: i for i, j in enumerate(chosen)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = pattern.fullmatch(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in rename:
            state[f"{path}.{rename[int(m.group(1))]}.{m.group(2)}"] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied(student)]
    if missing or unexpected:
        raise UnsupportedModelError(f"could not copy the teacher into the student: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")
    student.tie_weights()
    return student.to(next(teacher.parameters()).dtype).train(teacher.training)


def _tied(model: nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier one (tied heads are absent from state dicts)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(p.data_ptr(), name)
    return tied


def _kind(model_or_config) -> str:
    from .models import is_causal_lm

    return "causal" if is_causal_lm(model_or_config) else "masked"


def _vocab_size(config) -> int | None:
    return getattr(config, "vocab_size", None)


def check_configs(student_config, teacher_config) -> None:
    """From the configs alone (before any weights load): one kind of LM (causal or masked), one vocabulary size."""
    ks, kt = _kind(student_config), _kind(teacher_config)
    if ks != kt:
        raise IncompatibleModelsError(
            f"the teacher is a {kt} LM ({', '.join(teacher_config.architectures or [teacher_config.model_type])}) "
            f"but the student a {ks} LM ({', '.join(student_config.architectures or [student_config.model_type])}); "
            "distillation needs one kind: both causal or both masked"
        )
    vs, vt = _vocab_size(student_config), _vocab_size(teacher_config)
    if vs is not None and vt is not None and vs != vt:
        raise IncompatibleModelsError(
            f"vocabulary sizes differ: student {vs}, teacher {vt}; the student must use the teacher's "
            "vocabulary (build it from the teacher, or resize its embeddings to the teacher's tokenizer)."
        )


def check_tokenizers(student_tokenizer, teacher_tokenizer) -> None:
    """Teacher and student tokenizers map the same tokens to the same ids (not only as many of them)."""
    vs, vt = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vs == vt:
        return
    moved = sorted(t for t in set(vs) & set(vt) if vs[t] != vt[t])
    only_t, only_s = sorted(set(vt) - set(vs)), sorted(set(vs) - set(vt))
    example = (f"{moved[0]!r} is id {vt[moved[0]]} for the teacher, {vs[moved[0]]} for the student" if moved else
               f"{(only_t or only_s)[0]!r} is only in the {'teacher' if only_t else 'student'}'s")
    raise IncompatibleModelsError(
        f"the student's tokenizer differs from the teacher's ({len(moved)} tokens with other ids, {len(only_t)} only "
        f"in the teacher's, {len(only_s)} only in the student's; e.g. {example}): distillation compares the two "
        "models token by token, so they need one tokenizer. Save the teacher's tokenizer with the student."
    )


def check_compatible(student: nn.Module, teacher: nn.Module, need_hidden: bool = False, projection: bool = False) -> None:
    """Raise IncompatibleModelsError on another kind of LM, a vocabulary mismatch, or unequal hidden sizes
    for `cos`."""
    if _kind(student) != _kind(teacher):
        raise IncompatibleModelsError(
            f"the teacher is a {_kind(teacher)} LM ({type(teacher).__name__}) but the student a {_kind(student)} LM "
            f"({type(student).__name__}); distillation needs one kind: both causal or both masked"
        )
    vs = student.get_output_embeddings().weight.shape[0] if student.get_output_embeddings() is not None else None
    vt = teacher.get_output_embeddings().weight.shape[0] if teacher.get_output_embeddings() is not None else None
    if vs is None or vt is None:
        raise IncompatibleModelsError("teacher and student must both be language models with an output head")
    if vs != vt:
        raise IncompatibleModelsError(
            f"vocabulary sizes differ: student {vs}, teacher {vt}; the student must use the teacher's "
            "vocabulary (build it from the teacher, or resize its embeddings to the teacher's tokenizer)."
        )
    hs, ht = SiteGraph.from_model(student).hidden_size, SiteGraph.from_model(teacher).hidden_size
    if need_hidden and hs != ht and not projection:
        raise IncompatibleModelsError(
            f"the cosine objective compares hidden states, but the student's hidden size is {hs} and the "
            f"teacher's {ht}; pass --cos-projection to learn a linear map, or drop 'cos'/'diito_cos'."
        )
