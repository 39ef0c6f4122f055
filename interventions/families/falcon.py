from .base import Family

# Falcon: parallel unless parallel_attn=False (and always under new_decoder_architecture); in the
# parallel layouts the block adds the attention output into the MLP's output tensor in place.
FALCON = Family(
    name="falcon",
    model_types=("falcon",),
    layers="h",
    attention="self_attention",
    mlp="mlp",
    out_proj="self_attention.dense",
    parallel_residual=("parallel_attn", "new_decoder_architecture"),
    copy_mlp_output=True,
)
