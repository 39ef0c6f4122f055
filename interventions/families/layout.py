"""`LayerLayout`: where one block keeps each part a site reads — from its family table, or inferred.

Most decoders share a handful of child names (``self_attn``/``attn``, ``mlp``, ``o_proj``,
``down_proj``, ``post_attention_layernorm`` ...), so a structural inference finds the parts of the
architectures without a table; a table states only what the structure cannot show (a module that
adds the residual itself, a residual multiplier, a config switch for the parallel residual).
`LayerLayout.sources` records, part by part, which of the two decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import UnsupportedModelError
from .base import Family

# child names, in order of preference
ATTENTION = ("self_attn", "attn", "attention", "self_attention")
OUT_PROJ = ("o_proj", "out_proj", "c_proj", "dense", "out_lin", "wo")
MLP = ("mlp", "ffn", "feed_forward", "block_sparse_moe")
MLP_OUT_PROJ = ("down_proj", "c_proj", "fc2", "fc_out", "dense_4h_to_h", "w2", "lin2")
PRE_MLP_NORM = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "norm_2", "final_layer_norm",
                "feedforward_layernorm")
MOE_CHILDREN = ("experts",)  # transformers 5 fuses an MoE layer's experts into one module
PARALLEL_SWITCHES = ("use_parallel_residual", "parallel_attn", "new_decoder_architecture")


@dataclass(frozen=True)
class LayerLayout:
    """Paths (relative to one block) of the modules behind a layer's sites.

    attention:        the module that owns the q/k/v and output projections.
    out_proj:         the attention output projection (its input, per head: ``attention_heads``).
    attention_output: the module whose output is the attention contribution to the residual.
    mlp_output:       the module whose output is the MLP contribution to the residual.
    mlp_out_proj:     the MLP's output projection (its input: ``mlp_hidden``); None on MoE layers.
    residual_mid:     the module whose input is the residual after attention; None when parallel.
    residual_scale:   a factor the block applies to both contributions (Granite), else None.
    flattens:         the block flattens tokens to [batch*seq, ...] around the MLP (OPT).
    copy_mlp_output:  the block adds into the MLP output in place (Falcon): copy it when hooked.
    why_no_mid / why_no_neurons: the reason a site is missing, for the error message.
    sources:          part -> "table <name>" or "inferred".
    """

    attention: str
    out_proj: str
    attention_output: str
    mlp_output: str
    mlp_out_proj: str | None
    residual_mid: str | None
    residual_scale: float | None = None
    flattens: bool = False
    copy_mlp_output: bool = False
    parallel: bool = False
    why_no_mid: str = ""
    why_no_neurons: str = ""
    sources: dict = field(default_factory=dict, compare=False)


def _child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    children = dict(module.named_children())
    return next((n for n in names if n in children), None)


def _find(block: nn.Module, under: str, names: tuple[str, ...]) -> str | None:
    """The first descendant of block.<under> whose own name is one of `names` (in `names`' order)."""
    root = block.get_submodule(under)
    found = {path.rsplit(".", 1)[-1]: path for path, _ in root.named_modules() if path}
    hit = next((n for n in names if n in found), None)
    return None if hit is None else f"{under}.{found[hit]}"


def _parallel(family: Family | None, block: nn.Module, config) -> bool:
    switch = family.parallel_residual if family is not None else None
    if isinstance(switch, bool) and switch:
        return True
    names = (switch,) if isinstance(switch, str) else tuple(switch or ()) + PARALLEL_SWITCHES
    return any(bool(getattr(config, n, False)) for n in names)


def resolve(family: Family | None, block: nn.Module, config) -> LayerLayout:
    """The layout of `block`: the table's entries where it has them, the structural inference elsewhere."""
    sources: dict[str, str] = {}
    who = f"table {family.name}" if family is not None else "inferred"

    def pick(part: str, table_value, infer):
        if table_value is not None:
            sources[part] = who
            return table_value
        sources[part] = "inferred"
        return infer()

    fam = family
    attn_root = pick("attention", fam and fam.attention, lambda: _child(block, ATTENTION))
    if attn_root is None:
        raise UnsupportedModelError(
            f"{type(block).__name__} has no attention child (looked for {', '.join(ATTENTION)})")
    out_proj = pick("out_proj", fam and fam.out_proj, lambda: _find(block, attn_root, OUT_PROJ))
    if out_proj is None:
        raise UnsupportedModelError(
            f"{type(block).__name__}.{attn_root} has no output projection (looked for {', '.join(OUT_PROJ)})")
    attention = out_proj.rsplit(".", 1)[0]  # the module that owns the projections
    mlp = pick("mlp", fam and fam.mlp, lambda: _child(block, MLP) or _child(block, ("fc2",)))
    if mlp is None:
        raise UnsupportedModelError(
            f"{type(block).__name__} has no MLP child (looked for {', '.join(MLP + ('fc2',))})")
    flattens = (fam.mlp_flattens if fam is not None else False) or mlp == "fc2"

    # post-sublayer norms (Gemma 2/3, OLMo 2, EXAONE 4: post_feedforward_layernorm; GLM-4: post_mlp_layernorm)
    post_mlp = _child(block, ("post_feedforward_layernorm", "post_mlp_layernorm"))
    post_attn = None
    if post_mlp == "post_feedforward_layernorm":
        post_attn = _child(block, ("post_attention_layernorm",))
    elif post_mlp == "post_mlp_layernorm":
        post_attn = _child(block, ("post_self_attn_layernorm",))
    attention_output = pick("attention_output", fam and fam.attention_output, lambda: post_attn or attn_root)
    mlp_output = pick("mlp_output", fam and fam.mlp_output, lambda: post_mlp or mlp)

    mlp_module = block.get_submodule(mlp)
    is_moe = _child(mlp_module, MOE_CHILDREN) is not None
    why_no_neurons = ""
    if is_moe:
        mlp_out_proj = None
        why_no_neurons = (f"its MLP ({type(mlp_module).__name__}) is a mixture of experts whose experts are one "
                          "fused module, so there is no single output projection whose input is the neurons")
        sources["mlp_out_proj"] = "inferred"
    elif mlp == "fc2":
        mlp_out_proj = pick("mlp_out_proj", fam and fam.mlp_out_proj, lambda: "fc2")
    else:
        mlp_out_proj = pick("mlp_out_proj", fam and fam.mlp_out_proj,
                            lambda: (lambda c: c and f"{mlp}.{c}")(_child(mlp_module, MLP_OUT_PROJ)))
        if mlp_out_proj is None:
            why_no_neurons = f"no output projection was found in {type(mlp_module).__name__} " \
                             f"(looked for {', '.join(MLP_OUT_PROJ)})"

    parallel = _parallel(fam, block, config)
    why_no_mid = ""
    if fam is not None and fam.post_ln:
        residual_mid = None
        why_no_mid = "it is a post-LN encoder: the residual after attention is normalised before the MLP reads it"
        sources["residual_mid"] = who
    elif parallel:
        residual_mid = None
        why_no_mid = ("it has a parallel residual: attention and MLP both read the block input, so no residual "
                      "stream exists between them")
        sources["residual_mid"] = "config" if any(getattr(config, n, False) for n in PARALLEL_SWITCHES) else who
    else:
        def infer_mid():
            if post_mlp == "post_feedforward_layernorm" and _child(block, ("pre_feedforward_layernorm",)) is None:
                return mlp  # OLMo 2, EXAONE 4: the MLP reads the residual directly
            return _child(block, PRE_MLP_NORM)
        residual_mid = pick("residual_mid", fam and fam.residual_mid, infer_mid)
        if residual_mid is None:  # one norm feeding both sublayers (GPT-J, CodeGen, Cohere, Phi): parallel
            parallel = True
            why_no_mid = ("it has a parallel residual (one input norm feeds both sublayers), so no residual "
                          "stream exists between attention and MLP")
    scale = None
    if fam is not None and fam.residual_scale is not None:
        scale = float(getattr(config, fam.residual_scale))
        sources["residual_scale"] = who
    return LayerLayout(
        attention=attention, out_proj=out_proj, attention_output=attention_output, mlp_output=mlp_output,
        mlp_out_proj=mlp_out_proj, residual_mid=residual_mid, residual_scale=scale, flattens=flattens,
        copy_mlp_output=bool(fam is not None and fam.copy_mlp_output and parallel), parallel=parallel,
        why_no_mid=why_no_mid, why_no_neurons=why_no_neurons, sources=sources,
    )
