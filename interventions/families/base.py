"""`Family`: the declarative table that maps canonical site names onto one architecture's modules."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks and sublayers (paths are dotted module paths).

    layers:       the ModuleList of blocks, relative to the base model (``model.base_model``).
    attention:    the module whose output is the attention sublayer's contribution (relative to a block).
    mlp:          the module whose output is the MLP sublayer's contribution (relative to a block).
    out_proj:     the attention output projection; its input is the per-head result.
    num_heads:    config attribute holding the number of attention heads.
    parallel_residual: config attribute that, when true, feeds the MLP from the block input
                  (GPT-NeoX); or a bool.
    mlp_flattens: the MLP sees tokens flattened to [batch*seq, hidden] (OPT); its site is
                  still [batch, seq, hidden] (unflattened with the block input's shape).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    mlp: str
    out_proj: str
    num_heads: str = "num_attention_heads"
    hidden_size: str = "hidden_size"
    parallel_residual: str | bool = False
    mlp_flattens: bool = False
