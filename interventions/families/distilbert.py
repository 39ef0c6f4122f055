from .base import Family

DISTILBERT = Family(
    name="distilbert",
    model_types=("distilbert",),
    layers="transformer.layer",
    attention="attention",  # out_lin's output, before the residual add and sa_layer_norm
    mlp="ffn",
    out_proj="attention.out_lin",
    num_heads="n_heads",
    hidden_size="dim",
)
