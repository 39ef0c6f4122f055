"""`Family`: the declarative table that maps canonical site names onto one architecture's modules."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks and sublayers (paths are dotted module paths).

    layers:       the ModuleList of blocks, relative to the base model (``model.base_model``).
    attention:    the attention module (relative to a block); its output is the attention contribution
                  unless `attention_output` says otherwise.
    mlp:          the MLP module (relative to a block); its output is the MLP contribution unless
                  `mlp_output` says otherwise.
    out_proj:     the attention output projection; its input is the per-head result.
    num_heads:    config attribute holding the number of attention heads.
    parallel_residual: config attribute that, when true, feeds the MLP from the block input
                  (GPT-NeoX); or a bool.
    mlp_flattens: the MLP sees tokens flattened to [batch*seq, hidden] (OPT); its site is
                  still [batch, seq, hidden] (unflattened with the block input's shape).

    The fields below are optional: left None, `layout.resolve` infers them from the block's structure.
    attention_output / mlp_output: the module whose output is the sublayer's contribution to the residual,
                  where it is not `attention` / `mlp` (BLOOM: the dense projection, as the module adds the
                  residual itself; a post-sublayer norm is found structurally).
    mlp_out_proj: the MLP's output projection (its input is ``mlp_hidden``, the neurons).
    residual_mid: the module whose input is the residual between the sublayers (the pre-MLP norm).
    residual_scale: config attribute by which the block scales both contributions (Granite).
    post_ln:      a post-LN encoder (BERT): no residual between sublayers, and the identity
                  output = input + attention_output + mlp_output does not hold.
    copy_mlp_output: the block adds into the MLP's output tensor in place (Falcon's parallel layout),
                  so a hooked value is handed on as a copy.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    mlp: str
    out_proj: str
    num_heads: str = "num_attention_heads"
    hidden_size: str = "hidden_size"
    parallel_residual: str | tuple[str, ...] | bool = False
    mlp_flattens: bool = False
    attention_output: str | None = None
    mlp_output: str | None = None
    mlp_out_proj: str | None = None
    residual_mid: str | None = None
    residual_scale: str | None = None
    post_ln: bool = False
    copy_mlp_output: bool = False
