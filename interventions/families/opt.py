from .base import Family

OPT = Family(
    name="opt",
    model_types=("opt",),
    layers="decoder.layers",
    attention="self_attn",
    mlp="fc2",  # OPT has no MLP module: fc1 -> act -> fc2 (dropout is functional, after it)
    out_proj="self_attn.out_proj",
    mlp_flattens=True,  # the block reshapes hidden states to [batch*seq, hidden] around fc1/fc2
)
