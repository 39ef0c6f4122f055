from .base import Family

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral"),
    layers="layers",
    attention="self_attn",
    mlp="mlp",
    out_proj="self_attn.o_proj",
)
