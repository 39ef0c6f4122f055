from .base import Family

# Granite scales both sublayer outputs by config.residual_multiplier before the residual add.
GRANITE = Family(
    name="granite",
    model_types=("granite",),
    layers="layers",
    attention="self_attn",
    mlp="mlp",
    out_proj="self_attn.o_proj",
    residual_scale="residual_multiplier",
)
