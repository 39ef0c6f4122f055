from .base import Family

# Post-LN: the sublayer sites sit after dense + dropout, before the residual add and LayerNorm.
BERT = Family(
    name="bert",
    model_types=("bert", "roberta"),
    layers="encoder.layer",
    attention="attention.output.dropout",
    mlp="output.dropout",
    out_proj="attention.output.dense",
    mlp_out_proj="output.dense",
    post_ln=True,
)
