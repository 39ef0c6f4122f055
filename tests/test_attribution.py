"""`attribution_patching` against `value_and_grad`, against hand-written torch hooks + autograd (zero
perturbations added by raw `register_forward_hook`s, nothing from the library), and against real
patching (`interchange`): exact where the metric is linear in the site, second-order close otherwise."""

from __future__ import annotations

import pytest
import torch
from architectures import build_tiny
from conftest import build, hook_ids, tokens
from einops import rearrange

import interventions as iv
from interventions import InterventionError, ShapeError, Site

BASE = tokens(4, 6, seed=51)
SOURCE = tokens(4, 6, seed=52)


def logit_diff(logits):
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


def test_equals_value_and_grad_on_base_and_get_value_on_source(tiny):
    sites = [
        Site("layers.0.output"),
        Site("layers.1.attention_heads", positions=[1, -1], heads=[0, 2]),
        Site("layers.1.mlp_output", dims=[0, 3, 5]),
    ]
    got = iv.attribution_patching(tiny, BASE, SOURCE, sites, logit_diff)
    vg = iv.value_and_grad(tiny, BASE, sites, logit_diff)
    src = iv.get_value(tiny, SOURCE, sites)
    for site in sites:
        want = ((src[site] - vg.values[site]) * vg.grads[site]).sum(-1)
        torch.testing.assert_close(got[site], want)
    assert got[sites[0]].shape == (4, 6)
    assert got[sites[1]].shape == (4, 2, 2)  # [batch, positions, heads]
    assert got[sites[2]].shape == (4, 6)
    assert got["layers.0.output"] is got[sites[0]]


def _handwritten(model, base, source, layers, metric):
    """Attribution of each layer's heads, MLP and residual output, with raw torch hooks on GPT-2's modules."""
    blocks = model.transformer.h

    def points(layer):  # (name, module, pre-hook?) ; heads are c_proj's input viewed per head
        b = blocks[layer]
        return [
            (f"layers.{layer}.attention_heads", b.attn.c_proj, True),
            (f"layers.{layer}.mlp_output", b.mlp, False),
            (f"layers.{layer}.output", b, False),
        ]

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    heads = model.config.n_head
    src, handles = {}, []
    for layer in layers:
        for name, mod, pre in points(layer):
            if pre:
                handles.append(
                    mod.register_forward_pre_hook(
                        lambda m, a, n=name: src.__setitem__(
                            n, rearrange(a[0], "b s (h d) -> b s h d", h=heads)
                        )
                    )
                )
            else:
                handles.append(
                    mod.register_forward_hook(lambda m, a, o, n=name: src.__setitem__(n, first(o)))
                )
    with torch.no_grad():
        model(source)
    for h in handles:
        h.remove()
    handles.clear()
    base_vals, deltas = {}, {}
    for layer in layers:
        for name, mod, pre in points(layer):
            shape = src[name].shape
            deltas[name] = torch.zeros(shape, dtype=src[name].dtype, requires_grad=True)
            if pre:

                def hook(m, a, n=name):
                    base_vals[n] = rearrange(a[0], "b s (h d) -> b s h d", h=heads).detach()
                    return (a[0] + rearrange(deltas[n], "b s h d -> b s (h d)"),)

                handles.append(mod.register_forward_pre_hook(hook))
            else:

                def hook(m, a, o, n=name):
                    base_vals[n] = first(o).detach()
                    new = first(o) + deltas[n]
                    return (new, *o[1:]) if isinstance(o, tuple) else new

                handles.append(mod.register_forward_hook(hook))
    try:
        value = metric(model(base).logits)
    finally:
        for h in handles:
            h.remove()
    names = list(deltas)
    grads = torch.autograd.grad(value, [deltas[n] for n in names])
    return {n: ((src[n] - base_vals[n]) * g).sum(-1) for n, g in zip(names, grads)}


def test_equals_handwritten_hooks_and_autograd(gpt2):
    want = _handwritten(gpt2, BASE, SOURCE, range(2), logit_diff)
    before = hook_ids(gpt2)
    got = iv.attribution_patching(gpt2, BASE, SOURCE, list(want), logit_diff)
    assert hook_ids(gpt2) == before
    for name, w in want.items():
        torch.testing.assert_close(got[name], w)
        assert w.abs().max() > 1e-4, name  # a check that could fail


def test_exact_where_the_metric_is_linear_in_the_site(gpt2):
    """Patching the logits at one position changes a linear metric by exactly the linear estimate."""

    def metric(logits):  # linear in the logits of every position
        return (logits[:, :, 3] - 0.5 * logits[:, :, 7]).sum()

    got = iv.attribution_patching(gpt2, BASE, SOURCE, "logits", metric)["logits"]
    for b in range(BASE.shape[0]):
        clean = metric(iv.logits_of(gpt2(BASE[b : b + 1])))
        for p in range(BASE.shape[1]):
            patched = iv.interchange(gpt2, BASE[b : b + 1], SOURCE[b : b + 1], Site("logits", positions=[p]))
            torch.testing.assert_close(got[b, p], metric(iv.logits_of(patched)) - clean)


def test_second_order_close_to_real_patching_for_nearby_sources(gpt2):
    """For a source close to the base, |estimate - real effect| shrinks quadratically with the distance."""
    emb = gpt2.transformer.wte.weight[BASE[:1]].detach()
    direction = torch.randn(emb.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    site = Site("layers.0.output", positions=[2])
    errors = []
    for eps in (1e-2, 5e-3):
        base, source = {"inputs_embeds": emb}, {"inputs_embeds": emb + eps * direction}
        est = iv.attribution_patching(gpt2, base, source, site, logit_diff)[site][0, 0]
        real = logit_diff(iv.interchange(gpt2, base, source, site).logits) - logit_diff(
            gpt2(inputs_embeds=emb).logits
        )
        assert abs(real) > 1e-4
        errors.append(abs(est - real))
    assert errors[1] < errors[0] / 3  # second order: halving eps divides the error by ~4


def test_bad_inputs(gpt2):
    before = hook_ids(gpt2)
    with pytest.raises(ShapeError, match="same shape"):
        iv.attribution_patching(gpt2, BASE, SOURCE[:, :5], "layers.0.output", logit_diff)
    with pytest.raises(InterventionError, match="0-dim"):
        iv.attribution_patching(gpt2, BASE, SOURCE, "layers.0.output", lambda logits: logits[:, -1, 3])
    assert hook_ids(gpt2) == before


# -- AtP*'s QK fix ----------------------------------------------------------------------------------
def _pattern_change_oracle(model, base, source, name, positions, metric):
    """sum(d metric/d pattern * (patched pattern - pattern)), the patched pattern read from the model's own
    forward with one position's query/key of one head set to the source's (no formula of ours)."""
    layer = name.split(".")[1]
    pattern = f"layers.{layer}.attention_pattern"
    vg = iv.value_and_grad(model, base, [pattern], metric)
    A, g = vg.values[pattern], vg.grads[pattern]
    src = iv.get_value(model, source, name)[name]
    out = torch.zeros(src.shape[0], len(positions), src.shape[2], dtype=torch.float64)
    for i, t in enumerate(positions):
        for h in range(src.shape[2]):
            with iv.set_value(model, {Site(name, positions=[t], heads=[h]): src[:, t : t + 1, h : h + 1]}):
                patched = iv.get_value(model, base, pattern)[pattern]
            out[:, i, h] = (g * (patched - A)).sum((1, 2, 3))
    return out


def test_qk_fix_recomputes_the_pattern_exactly(tiny):
    """Keys (KV heads on Llama), queries: the fixed estimate = the model's own patched pattern, linearised."""
    sites = [
        Site("layers.1.keys"),
        Site("layers.1.queries", positions=[2, -1]),
        Site("layers.0.keys", heads=[1]),
        Site("layers.1.output"),
    ]
    plain = iv.attribution_patching(tiny, BASE, SOURCE, sites, logit_diff)
    fixed = iv.attribution_patching(tiny, BASE, SOURCE, sites, logit_diff, qk_fix=True)
    tol = dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        fixed[sites[0]],
        _pattern_change_oracle(tiny, BASE, SOURCE, "layers.1.keys", range(6), logit_diff),
        **tol,
    )
    torch.testing.assert_close(
        fixed[sites[1]],
        _pattern_change_oracle(tiny, BASE, SOURCE, "layers.1.queries", [2, 5], logit_diff),
        **tol,
    )
    torch.testing.assert_close(
        fixed[sites[2]],
        _pattern_change_oracle(tiny, BASE, SOURCE, "layers.0.keys", range(6), logit_diff)[..., 1:2],
        **tol,
    )
    torch.testing.assert_close(fixed[sites[3]], plain[sites[3]])  # other sites keep the plain estimate
    per_example = torch.tensor([[0, 4], [5, 1], [2, 2], [3, 0]])  # positions per example ([batch, k])
    picked = iv.attribution_patching(
        tiny,
        BASE,
        SOURCE,
        [Site("layers.1.keys", positions=per_example), Site("layers.1.queries", positions=per_example)],
        logit_diff,
        qk_fix=True,
    )
    whole = iv.attribution_patching(
        tiny, BASE, SOURCE, ["layers.1.keys", "layers.1.queries"], logit_diff, qk_fix=True
    )
    for name in ("layers.1.keys", "layers.1.queries"):
        want = whole[name].gather(1, per_example[:, :, None].expand(-1, -1, whole[name].shape[2]))
        torch.testing.assert_close(picked[Site(name, positions=per_example)], want)
    assert fixed[sites[0]].shape == (
        4,
        6,
        tiny.config.num_key_value_heads if hasattr(tiny.config, "num_key_value_heads") else 4,
    )
    assert not torch.allclose(fixed[sites[0]], plain[sites[0]])


def test_qk_fix_on_an_encoder_with_padding():
    """BERT attends both ways; padded keys stay masked in the recomputed pattern."""
    import transformers as tf
    from conftest import randomise

    config = tf.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=24, max_position_embeddings=40, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    bert = randomise(tf.BertForMaskedLM(config)).double().eval()
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    base, source = ({"input_ids": tokens(3, 6, s), "attention_mask": mask} for s in (1, 2))

    def metric(logits):
        return (logits[:, 2, 3] - logits[:, 2, 5]).mean()

    for name in ("layers.1.keys", "layers.0.queries"):
        got = iv.attribution_patching(bert, base, source, name, metric, qk_fix=True)[name]
        want = _pattern_change_oracle(bert, base, source, name, range(6), metric)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert got.abs().max() > 0


def saturated(scale: float, seed: int = 0):
    """Tiny GPT-2 whose layer-1 queries are scaled up: its attention is near one-hot (saturated)."""
    model = build("gpt2", seed=seed)
    width = model.config.n_embd
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[:, :width] *= scale
        model.transformer.h[1].attn.c_attn.bias[:width] *= scale
    return model


def test_qk_fix_removes_false_negatives_under_saturated_attention():
    model = saturated(10.0)
    base, source = tokens(8, 8, 10), tokens(8, 8, 20)

    def per_example(logits):
        return logits[:, -1, 3] - logits[:, -1, 5]

    def metric(logits):
        return per_example(logits).mean()

    pattern = iv.get_value(model, base, "layers.1.attention_pattern")["layers.1.attention_pattern"]
    assert pattern.amax(-1).mean() > 0.9  # saturated
    clean = per_example(model(base).logits)
    name = "layers.1.keys"
    plain = iv.attribution_patching(model, base, source, name, metric)[name]
    fixed = iv.attribution_patching(model, base, source, name, metric, qk_fix=True)[name]
    real = torch.zeros_like(plain)  # real activation patching, one (position, head) at a time
    for t in range(8):
        for h in range(4):
            with torch.no_grad():
                patched = iv.interchange(model, base, source, Site(name, positions=[t], heads=[h])).logits
            real[:, t, h] = (per_example(patched) - clean) / 8
    threshold = 0.1 * real.abs().max()
    matters = real.abs() > threshold
    missed_plain = int((matters & (plain.abs() < threshold)).sum())
    missed_fixed = int((matters & (fixed.abs() < threshold)).sum())
    assert matters.sum() >= 10
    assert missed_plain >= matters.sum() // 2  # the linear estimate misses most of them ...
    assert missed_fixed <= matters.sum() // 5  # ... the QK fix finds almost all
    assert (fixed - real).abs().sum() < 0.3 * (plain - real).abs().sum()


def test_qk_fix_bad_inputs(gpt2):
    with pytest.raises(InterventionError, match="none of the sites"):
        iv.attribution_patching(gpt2, BASE, SOURCE, ["layers.0.output"], logit_diff, qk_fix=True)
    with pytest.raises(InterventionError, match="whole query/key vectors"):
        iv.attribution_patching(
            gpt2, BASE, SOURCE, [Site("layers.0.keys", dims=[0, 1])], logit_diff, qk_fix=True
        )
    # BLOOM adds ALiBi biases to its scores: softmax(scaling * q k^T + mask) is not its pattern
    bloom = build_tiny("bloom")
    before = hook_ids(bloom)
    ids = tokens(2, 6, 3)
    with pytest.raises(iv.UnsupportedModelError, match="ALiBi.*qk_fix=False"):
        iv.attribution_patching(bloom, ids, tokens(2, 6, 4), ["layers.0.keys"], logit_diff, qk_fix=True)
    assert hook_ids(bloom) == before


@pytest.mark.parametrize("name", ["gemma2", "mistral", "gpt_neo", "opt", "qwen2"])
def test_qk_fix_score_variants(name):
    """Soft-capping and sliding windows (Gemma 2), sliding windows (Mistral), local attention and no scaling
    (GPT-Neo), a query scale folded in (OPT), grouped KV heads (Qwen2): exact against the model's pattern."""
    model = build_tiny(name)
    base, source = tokens(2, 7, 5), tokens(2, 7, 6)
    for layer in range(model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else 2):
        site = f"layers.{layer}.keys"
        got = iv.attribution_patching(model, base, source, site, logit_diff, qk_fix=True)[site]
        want = _pattern_change_oracle(model, base, source, site, range(7), logit_diff)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
