from .base import Family

STABLELM = Family(
    name="stablelm",
    model_types=("stablelm",),
    layers="layers",
    attention="self_attn",
    mlp="mlp",
    out_proj="self_attn.o_proj",
    parallel_residual="use_parallel_residual",
)
