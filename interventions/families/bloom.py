from .base import Family

# BLOOM's attention and MLP modules add the residual themselves (dropout_add): the contributions are
# the dense projections' outputs.
BLOOM = Family(
    name="bloom",
    model_types=("bloom",),
    layers="h",
    attention="self_attention",
    mlp="mlp",
    out_proj="self_attention.dense",
    attention_output="self_attention.dense",
    mlp_output="mlp.dense_4h_to_h",
    mlp_out_proj="mlp.dense_4h_to_h",
    residual_mid="post_attention_layernorm",
    num_heads="n_head",
)
