from .base import Family

# MPT's MLP adds the residual itself: its contribution is the down projection's output.
MPT = Family(
    name="mpt",
    model_types=("mpt",),
    layers="blocks",
    attention="attn",
    mlp="ffn",
    out_proj="attn.out_proj",
    mlp_output="ffn.down_proj",
    mlp_out_proj="ffn.down_proj",
    residual_mid="norm_2",
)
