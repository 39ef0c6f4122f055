from .base import Family

QWEN2 = Family(
    name="qwen2",
    model_types=("qwen2",),
    layers="layers",
    attention="self_attn",
    mlp="mlp",
    out_proj="self_attn.o_proj",
)
