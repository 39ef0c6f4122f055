"""Independent oracles: hand-written GPT-2 and Llama forwards from the weights, exposing every site.

Nothing here calls a Hugging Face module's forward or the code under test: only state_dict tensors,
the config and plain torch ops. `forward(model, ids, edits)` applies per-site edits
(site name -> fn(value) -> value, or a list of them, applied in order) where the engine's hooks would,
and returns every site's (edited) value plus the logits. `select` / `write` are loop-based
re-implementations of the selector semantics (positions axis 1, heads axis 2, dims last axis).

Sites per layer: input, queries, keys, values ([b, s, (kv_)heads, head_dim]; queries after rotary
and before the score scaling), attention_pattern ([b, heads, q, k], post-softmax), attention_heads,
attention_output, residual_mid, mlp_hidden (the input of the MLP's output projection), mlp_output,
output; and final_norm (the input of the output embedding), logits. (`select` / `write` assume
the [b, s, (heads,) dims] layout; the pattern's heads are axis 1 and its query positions axis 2.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

Edit = Callable[[torch.Tensor], torch.Tensor]


# -- selectors, written as plain loops ------------------------------------------------------------
def _rows(positions, batch: int, seq: int) -> list[list[int]]:
    """Per-example position lists (negative ints count from the end)."""
    if positions is None:
        return [list(range(seq))] * batch
    if isinstance(positions, torch.Tensor):
        if positions.dim() == 1:
            positions = positions.tolist()
        else:
            return [[int(p) for p in row] for row in positions]
    return [[int(p) % seq for p in positions]] * batch


def _index_list(sel, size: int) -> list[int]:
    if sel is None:
        return list(range(size))
    if isinstance(sel, slice):
        return list(range(size))[sel]
    return [int(s) % size for s in sel]


def select(value: torch.Tensor, positions=None, heads=None, dims=None) -> torch.Tensor:
    """The selected slice [batch, k, (heads,) dims] of a site value, gathered example by example."""
    d = _index_list(dims, value.shape[-1])
    if value.dim() == 2:
        return torch.stack([value[b][d] for b in range(value.shape[0])])
    rows = _rows(positions, value.shape[0], value.shape[1])
    out = []
    for b, row in enumerate(rows):
        per_pos = []
        for p in row:
            if value.dim() == 4:
                hs = _index_list(heads, value.shape[2])
                per_pos.append(torch.stack([value[b, p, h][d] for h in hs]))
            else:
                per_pos.append(value[b, p][d])
        out.append(torch.stack(per_pos))
    return torch.stack(out)


def write(value: torch.Tensor, new: torch.Tensor, positions=None, heads=None, dims=None) -> torch.Tensor:
    """A copy of `value` whose selected slice is `new` (batch 1 broadcasts), written example by example."""
    out = value.clone()
    batch = value.shape[0]
    if new.shape[0] == 1 and batch != 1:
        new = new.expand(batch, *new.shape[1:])
    d = torch.tensor(_index_list(dims, value.shape[-1]))
    if value.dim() == 2:
        for b in range(batch):
            out[b, d] = new[b]
        return out
    rows = _rows(positions, batch, value.shape[1])
    for b, row in enumerate(rows):
        for k, p in enumerate(row):
            if value.dim() == 4:
                for hh, h in enumerate(_index_list(heads, value.shape[2])):
                    out[b, p, h, d] = new[b, k, hh]
            else:
                out[b, p, d] = new[b, k]
    return out


def edit_at(fn: Callable[[torch.Tensor], torch.Tensor], positions=None, heads=None, dims=None) -> Edit:
    """An edit that replaces the selected slice `cur` by `fn(cur)`."""
    return lambda value: write(value, fn(select(value, positions, heads, dims)), positions, heads, dims)


def set_to(new: torch.Tensor, positions=None, heads=None, dims=None) -> Edit:
    """An edit that writes the tensor `new` into the selected slice."""
    return edit_at(lambda cur: new, positions, heads, dims)


# -- shared pieces ------------------------------------------------------------------------------
class _Trace:
    """Applies edits at a site and records the (edited) value."""

    def __init__(self, edits: Mapping[str, Edit | Sequence[Edit]] | None):
        self.edits = dict(edits or {})
        self.values: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        fns = self.edits.get(name, ())
        for fn in [fns] if callable(fns) else fns:
            value = fn(value)
        self.values[name] = value
        return value


def _attend(site: "_Trace", layer: int, q, k, v, mask) -> torch.Tensor:
    """Per-head causal attention, exposing the attention-internal sites of layer `layer`.

    q [b,s,heads,d] (after rotary, before the score scaling), k/v [b,s,kv_heads,d] (query head j
    reads key/value head j // (heads // kv_heads)), mask [b,s] (1 = real token) -> [b,s,heads,d].
    """
    p = f"layers.{layer}."
    q, k, v = site(p + "queries", q), site(p + "keys", k), site(p + "values", v)
    seq, heads = q.shape[1], q.shape[2]
    group = heads // k.shape[2]
    k = torch.stack([k[:, :, j // group] for j in range(heads)], dim=2)
    v = torch.stack([v[:, :, j // group] for j in range(heads)], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = site(p + "attention_pattern", torch.softmax(scores, dim=-1))  # [b, heads, q, k]
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _rms_norm(x, weight, eps):
    """RMSNorm; like Llama's, the normalisation itself runs in float32 whatever x's dtype."""
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _linear(x, sd, prefix):
    """nn.Linear from its weight [out, in] and optional bias."""
    y = x @ sd[prefix + ".weight"].T
    return y + sd[prefix + ".bias"] if prefix + ".bias" in sd else y


# -- GPT-2 --------------------------------------------------------------------------------------
def gpt2_forward(model, input_ids, edits=None, attention_mask=None) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel from its weights: pre-LN blocks, Conv1D ([in, out]) projections, tied head."""
    sd, cfg = model.state_dict(), model.config
    heads, width = cfg.n_head, cfg.n_embd
    eps = cfg.layer_norm_epsilon
    site = _Trace(edits)
    b, s = input_ids.shape
    h = sd["transformer.wte.weight"][input_ids] + sd["transformer.wpe.weight"][torch.arange(s)][None]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = site(f"layers.{i}.input", h)
        x = _layer_norm(h, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
        qkv = x @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(b, s, heads, width // heads) for t in qkv.split(width, dim=-1))
        z = site(f"layers.{i}.attention_heads", _attend(site, i, q, k, v, attention_mask))
        a = z.reshape(b, s, width) @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = site(f"layers.{i}.residual_mid", h + site(f"layers.{i}.attention_output", a))
        x = _layer_norm(h, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
        m = site(f"layers.{i}.mlp_hidden", _gelu_tanh(x @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"]))
        m = m @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
        h = h + site(f"layers.{i}.mlp_output", m)
        h = site(f"layers.{i}.output", h)
    h = site("final_norm", _layer_norm(h, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], eps))
    site("logits", h @ sd["transformer.wte.weight"].T)
    return site.values


# -- Llama --------------------------------------------------------------------------------------
def _rope(x, theta: float):
    """Rotary embedding (rotate-half convention) of x [b,s,h,d] at positions 0..s-1.

    The angle table is float32 whatever x's dtype, as Llama defines it (a float64 table would
    differ from the model's by ~1e-6 in the logits).
    """
    seq, dim = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None]  # [s, d/2]
    angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def llama_forward(model, input_ids, edits=None, attention_mask=None) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM from its weights: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""
    sd, cfg = model.state_dict(), model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    eps = cfg.rms_norm_eps
    site = _Trace(edits)
    b, s = input_ids.shape
    h = sd["model.embed_tokens.weight"][input_ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = site(f"layers.{i}.input", h)
        x = _rms_norm(h, sd[p + "input_layernorm.weight"], eps)
        q = _rope(_linear(x, sd, p + "self_attn.q_proj").reshape(b, s, heads, hd), theta)
        k = _rope(_linear(x, sd, p + "self_attn.k_proj").reshape(b, s, kv_heads, hd), theta)
        v = _linear(x, sd, p + "self_attn.v_proj").reshape(b, s, kv_heads, hd)
        z = site(f"layers.{i}.attention_heads", _attend(site, i, q, k, v, attention_mask))
        a = _linear(z.reshape(b, s, heads * hd), sd, p + "self_attn.o_proj")
        h = site(f"layers.{i}.residual_mid", h + site(f"layers.{i}.attention_output", a))
        x = _rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        gate = _linear(x, sd, p + "mlp.gate_proj")
        neurons = site(f"layers.{i}.mlp_hidden", gate * torch.sigmoid(gate) * _linear(x, sd, p + "mlp.up_proj"))
        m = _linear(neurons, sd, p + "mlp.down_proj")
        h = h + site(f"layers.{i}.mlp_output", m)
        h = site(f"layers.{i}.output", h)
    h = site("final_norm", _rms_norm(h, sd["model.norm.weight"], eps))
    site("logits", _linear(h, sd, "lm_head"))
    return site.values


ORACLES = {"gpt2": gpt2_forward, "llama": llama_forward}


def forward(model, input_ids, edits=None, attention_mask=None) -> dict[str, torch.Tensor]:
    """Every canonical site's value (after `edits`) and 'logits', for a GPT-2 or Llama model."""
    return ORACLES[model.config.model_type](model, input_ids, edits, attention_mask)


def interchange_edit(source_value: torch.Tensor, base_sel: dict, source_sel: dict | None = None,
                     mix: Callable | None = None) -> Edit:
    """The edit an interchange makes: the source's selected slice (optionally mixed) into the base's."""
    src = select(source_value, **(source_sel if source_sel is not None else base_sel))
    if mix is None:
        return set_to(src, **base_sel)
    return edit_at(lambda cur: mix(cur, src), **base_sel)
