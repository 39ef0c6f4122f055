from .base import Family

GPT_NEOX = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="layers",
    attention="attention",
    mlp="mlp",
    out_proj="attention.dense",
    parallel_residual="use_parallel_residual",
)
