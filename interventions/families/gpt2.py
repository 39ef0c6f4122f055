from .base import Family

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    layers="h",
    attention="attn",  # c_proj + resid_dropout, before the residual add
    mlp="mlp",
    out_proj="attn.c_proj",
    num_heads="n_head",
    hidden_size="n_embd",
)
