from .base import Family

DISTILBERT = Family(
    name="distilbert",
    model_types=("distilbert",),
    layers="transformer.layer",
    attention="attention",  # out_lin's output, before the residual add and sa_layer_norm
    mlp="ffn",
    out_proj="attention.out_lin",
    mlp_out_proj="ffn.lin2",
    post_ln=True,
    num_heads="n_heads",
    hidden_size="dim",
)
