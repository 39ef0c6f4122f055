"""Identities that hold on any residual decoder, over every model type of tests/architectures.py.

Each identity is one function `check_<name>(model, graph, x, tol)` listed in `IDENTITIES`, so that a
new site brings its own identity by adding one function. The oracles are the model itself
(``output_hidden_states``, its own logits), plain torch hooks written here (the output embedding's
input), and algebra: ``output == input + attention_output + mlp_output``. `SUPPORT` is what
docs/sites.md's architecture table is generated from (`test_docs_table_is_current`).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import architectures as A
import pytest
import torch
from conftest import hook_ids

from interventions import SiteGraph, UnknownSiteError, Zero, get_value, interchange, set_value

X = A.tokens(2, A.SEQ, seed=1)
SOURCE = A.tokens(2, A.SEQ, seed=2)


@functools.lru_cache(maxsize=None)
def tiny(name: str) -> torch.nn.Module:
    """One shared model per name (interventions never change weights; surgery tests build their own)."""
    return A.build_tiny(name)


def layer_values(model, i: int, kinds) -> list[torch.Tensor]:
    names = [f"layers.{i}.{k}" for k in kinds]
    got = get_value(model, X, names)
    return [got[n] for n in names]


# -- identities -------------------------------------------------------------------------------------
def check_hidden_states(model, graph, tol):
    """input / output equal output_hidden_states (except the last output: reported after the final norm)."""
    hs = model(X, output_hidden_states=True).hidden_states
    assert len(hs) == graph.num_layers + 1
    for i in range(graph.num_layers):
        (inp, out) = layer_values(model, i, ("input", "output"))
        torch.testing.assert_close(inp, hs[i], **tol)
        if i < graph.num_layers - 1:
            torch.testing.assert_close(out, hs[i + 1], **tol)


def check_residual_sum(model, graph, tol):
    """output = input + attention_output + mlp_output, and both contributions are non-trivial."""
    for i in range(graph.num_layers):
        inp, attn, mlp, out = layer_values(model, i, ("input", "attention_output", "mlp_output", "output"))
        assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3
        torch.testing.assert_close(out, inp + attn + mlp, **tol)


def check_zeroed_sublayers(model, graph, tol):
    """Zeroing both sublayers makes the block the identity."""
    for i in range(graph.num_layers):
        zero = {f"layers.{i}.attention_output": Zero(), f"layers.{i}.mlp_output": Zero()}
        with set_value(model, zero):
            inp, out = layer_values(model, i, ("input", "output"))
        torch.testing.assert_close(out, inp, **tol)
        assert not torch.allclose(out, layer_values(model, i, ("output",))[0], **tol)


def check_full_interchange(model, graph, tol):
    """Interchanging the whole of layers.0.output gives the source's logits."""
    got = interchange(model, X, SOURCE, "layers.0.output").logits
    torch.testing.assert_close(got, model(SOURCE).logits, **tol)
    assert not torch.allclose(model(X).logits, model(SOURCE).logits, **tol)


def check_residual_mid(model, graph, tol):
    """residual_mid = input + attention_output on sequential layouts (and writes move the output too);
    a clear error on parallel ones."""
    for i in range(graph.num_layers):
        name = f"layers.{i}.residual_mid"
        if graph.layouts[i].parallel:
            with pytest.raises(UnknownSiteError, match="parallel residual"):
                get_value(model, X, name)
            continue
        inp, attn, mid = layer_values(model, i, ("input", "attention_output", "residual_mid"))
        torch.testing.assert_close(mid, inp + attn, **tol)
        # setting it: the MLP reads the new value and the block adds the MLP output to the new value
        new = mid.flip(1)
        with set_value(model, {name: new}):
            got_mid, mlp, out = layer_values(model, i, ("residual_mid", "mlp_output", "output"))
        torch.testing.assert_close(got_mid, new, **tol)
        torch.testing.assert_close(out, new + mlp, **tol)


def check_final_norm(model, graph, tol):
    """final_norm is the input of the output embedding (read with a plain pre-hook here)."""
    seen = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model(X)
    finally:
        handle.remove()
    torch.testing.assert_close(get_value(model, X, "final_norm")["final_norm"], seen[0], **tol)


def check_mlp_hidden(model, graph, tol):
    """mlp_hidden is the input of the MLP's output projection (a plain pre-hook here); a clear error on MoE."""
    for i in range(graph.num_layers):
        name = f"layers.{i}.mlp_hidden"
        proj = graph.layouts[i].mlp_out_proj
        if proj is None:
            with pytest.raises(UnknownSiteError, match="mixture of experts"):
                get_value(model, X, name)
            continue
        module = A_block(model, graph, i).get_submodule(proj)
        seen = []
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            model(X)
        finally:
            handle.remove()
        got = get_value(model, X, name)[name]
        torch.testing.assert_close(got.reshape(seen[0].shape), seen[0], **tol)
        assert got.shape[:2] == X.shape
        # zeroing the neurons leaves the output projection with its bias alone
        outs = []
        handle = module.register_forward_hook(lambda m, args, out: outs.append(out.clone()))
        try:
            with set_value(model, {name: Zero()}):
                model(X)
        finally:
            handle.remove()
        bias = getattr(module, "bias", None)
        expected = torch.zeros_like(outs[0]) if bias is None else bias.expand_as(outs[0])
        torch.testing.assert_close(outs[0], expected, **tol)


def A_block(model, graph, i):
    return model.get_submodule(graph.layers_path)[i]


IDENTITIES = [check_hidden_states, check_residual_sum, check_zeroed_sublayers, check_full_interchange,
              check_residual_mid, check_final_norm, check_mlp_hidden]


@pytest.mark.parametrize("name", A.NAMES)
def test_identities(name):
    model = tiny(name)
    model(X, output_hidden_states=True)  # transformers installs its own recording hooks on first use
    before = hook_ids(model)
    graph = SiteGraph.from_model(model)
    assert graph.num_layers == 2 and graph.layouts
    tol = A.tolerance(model)
    for identity in IDENTITIES:
        identity(model, graph, tol)
    assert hook_ids(model) == before


# -- the supported-architecture table ----------------------------------------------------------------
def support_row(name: str) -> str:
    model = tiny(name)
    graph = SiteGraph.from_model(model)
    layout = graph.layouts[-1]
    fam = graph.family.name if graph.family else "inferred"
    has = lambda site: "yes" if site in graph else "—"  # noqa: E731
    mid = "yes" if "layers.0.residual_mid" in graph else "no (parallel)"
    neurons = ", ".join(str(i) for i in range(graph.num_layers) if f"layers.{i}.mlp_hidden" in graph)
    neurons = "yes" if neurons == "0, 1" else ("no (MoE)" if not neurons else f"layers {neurons} (others MoE)")
    scale = " × residual_multiplier" if layout.residual_scale is not None else ""
    return (f"| `{name}` | {type(model).__name__} | {fam} | {'parallel' if layout.parallel else 'sequential'} "
            f"| {mid} | {neurons} | {has('final_norm')} | `{layout.attention_output}`{scale} "
            f"| `{layout.mlp_output}`{scale} |")


def support_table() -> str:
    head = ("| model type | class | table | residual | residual_mid | mlp_hidden | final_norm "
            "| attention_output = output of | mlp_output = output of |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    return head + "\n".join(support_row(n) for n in A.NAMES) + "\n"


DOC = Path(__file__).resolve().parents[1] / "docs" / "sites.md"
BEGIN, END = "<!-- architectures: begin (generated by tests/test_architectures.py) -->\n", \
    "<!-- architectures: end -->"


def test_docs_table_is_current():
    """docs/sites.md's table is the one this test generates (run with WRITE_DOCS=1 to rewrite it)."""
    import os

    text = DOC.read_text()
    table = support_table()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    if os.environ.get("WRITE_DOCS"):
        DOC.write_text(text[:start] + table + text[stop:])
        text = DOC.read_text()
    assert text[start:text.index(END)] == table


# -- the graph follows the model ----------------------------------------------------------------------
def test_replacing_a_block_rebuilds_the_graph():
    model = A.build_tiny("gpt2")
    x = X
    clean = model(x).logits
    get_value(model, x, "layers.1.output")  # the graph is cached now
    model.transformer.h[1] = copy.deepcopy(model.transformer.h[1])
    zeroed = set_value(model, {"layers.1.output": Zero()}, inputs=x).logits
    assert not torch.allclose(zeroed, clean)
    with torch.no_grad():
        want = model.lm_head(model.transformer.ln_f(torch.zeros(2, A.SEQ, A.HIDDEN, dtype=torch.float64)))
    torch.testing.assert_close(zeroed, want)


def test_deleting_and_appending_blocks_rebuilds_the_graph():
    model = A.build_tiny("llama")
    get_value(model, X, "layers.1.output")
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    graph = SiteGraph.from_model(model)
    assert graph.num_layers == 1
    with pytest.raises(UnknownSiteError, match=r"layers\.\{0\.\.0\}"):
        get_value(model, X, "layers.1.output")
    hs = model(X, output_hidden_states=True).hidden_states
    torch.testing.assert_close(get_value(model, X, "layers.0.input")["layers.0.input"], hs[0])
    model.model.layers.append(copy.deepcopy(model.model.layers[0]))  # in place: same ModuleList, longer
    model.config.num_hidden_layers = 2
    assert SiteGraph.from_model(model).num_layers == 2
    out = get_value(model, X, "layers.1.output")["layers.1.output"]
    ins = get_value(model, X, "layers.1.input")["layers.1.input"]
    parts = get_value(model, X, ["layers.1.attention_output", "layers.1.mlp_output"])
    torch.testing.assert_close(out, ins + parts["layers.1.attention_output"] + parts["layers.1.mlp_output"])


def test_replacing_a_sublayer_rebuilds_the_graph():
    model = A.build_tiny("gpt2")
    clean = model(X).logits
    get_value(model, X, "layers.1.mlp_output")
    model.transformer.h[1].mlp = copy.deepcopy(model.transformer.h[1].mlp)
    graph = SiteGraph.from_model(model)
    assert graph.point("layers.1.mlp_output").module is model.transformer.h[1].mlp
    assert graph.point("layers.1.mlp_hidden").module is model.transformer.h[1].mlp.c_proj
    zeroed = set_value(model, {"layers.1.mlp_output": Zero()}, inputs=X).logits
    assert not torch.allclose(zeroed, clean)
    v = get_value(model, X, ["layers.1.residual_mid"])
    with set_value(model, {"layers.1.mlp_output": Zero()}):
        out = get_value(model, X, "layers.1.output")["layers.1.output"]
    torch.testing.assert_close(out, v["layers.1.residual_mid"])


def test_describe_names_tables_and_inference():
    text = SiteGraph.from_model(A.build_tiny("granite")).describe()
    assert "table granite" in text and "residual_scale" in text and "0.5" in text
    text = SiteGraph.from_model(A.build_tiny("gemma2")).describe()
    assert "post_feedforward_layernorm" in text and "[inferred]" in text
    assert "parallel" in SiteGraph.from_model(A.build_tiny("gptj")).describe()


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, site, match", [
    ("gptj", "layers.0.residual_mid", "parallel residual.*Sites of layer 0: input"),
    ("mixtral", "layers.1.mlp_hidden", "mixture of experts"),
    ("llama", "layers.0.mlp_neurons", "mlp_hidden"),
    ("llama", "layers.5.residual_mid", r"layers\.\{0\.\.1\}"),
])
def test_missing_sites_are_clear_errors(name, site, match):
    model = A.build_tiny(name)
    before = hook_ids(model)
    clean = model(X).logits
    with pytest.raises(UnknownSiteError, match=match):
        set_value(model, {site: Zero()}, inputs=X)
    with pytest.raises(UnknownSiteError, match=match):
        get_value(model, X, site)
    assert hook_ids(model) == before
    torch.testing.assert_close(model(X).logits, clean)


def test_dims_out_of_range_name_the_width():
    from interventions import SelectorError, Site

    model = A.build_tiny("llama")
    before = hook_ids(model)
    for site, width in (("layers.0.mlp_hidden", A.FFN), ("layers.0.residual_mid", A.HIDDEN),
                        ("final_norm", A.HIDDEN)):
        with pytest.raises(SelectorError, match=f"size {width}"):
            get_value(model, X, Site(site, dims=[width]))
        with pytest.raises(SelectorError, match="no heads"):
            get_value(model, X, Site(site, heads=[0]))
    assert hook_ids(model) == before


# -- attention internals: queries, keys, values, attention_pattern ------------------------------------
# Oracles: algebra on the sites' own values (softmax(q·kᵀ·scale + mask) = pattern, pattern · values =
# attention_heads), the masks written here from the config (causal, sliding window), and the model's
# fast path (an explicit pattern at one layer leaves the logits unchanged).
ATTN = ("queries", "keys", "values", "attention_pattern")


def _model_type(name: str) -> str:
    return A.VARIANTS.get(name, (name, {}))[0]


def _attention_supported() -> list[str]:
    from interventions.attention import UNSUPPORTED

    return [n for n in A.NAMES if _model_type(n) not in UNSUPPORTED]


def _window(config, layer: int):
    """The sliding window of `layer` from the config (None: full causal attention)."""
    if config.model_type == "gpt_neo":
        return config.window_size if config.attention_layers[layer] == "local" else None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[layer] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


def _allowed(config, layer: int, seq: int) -> torch.Tensor:
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
    window = _window(config, layer)
    if window is not None and window < seq:
        allowed &= ~torch.ones(seq, seq, dtype=torch.bool).tril(-window)
    return allowed


def _attention_state(model, graph):
    """The attention registry and every hooked modeling file's eager function (must be restored)."""
    import inspect

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    eager = {}
    for i in range(graph.num_layers):
        g = inspect.unwrap(type(graph.point(f"layers.{i}.queries").module).forward).__globals__
        eager[id(g)] = g.get("eager_attention_forward")
    return dict(AttentionInterface._global_mapping), dict(ALL_ATTENTION_FUNCTIONS._local_mapping), eager


def check_attention_pattern(model, graph, tol):
    """The pattern is causal (sliding window respected), rows sum to 1, it equals softmax(q·kᵀ·scale
    [soft-capped] + ALiBi + mask) recomputed from the queries and keys, and computing it
    explicitly at one layer (the others on their fast path) leaves the logits unchanged."""
    config, seq = model.config, X.shape[1]
    state = _attention_state(model, graph)
    for i in range(graph.num_layers):
        q, k, v, p = layer_values(model, i, ATTN)
        heads, kv = q.shape[2], k.shape[2]
        assert p.shape == (2, heads, seq, seq) and v.shape == k.shape and heads % kv == 0
        assert q.shape[:2] == k.shape[:2] == X.shape and q.shape[-1] == k.shape[-1]
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), **tol)
        allowed = _allowed(config, i, seq)
        assert p.masked_select(~allowed).abs().max() == 0, "weight outside the causal / sliding-window mask"
        module = graph.point(f"layers.{i}.queries").module
        scale = 1.0 if config.model_type == "gpt_neo" else getattr(module, "scaling", None) or q.shape[-1] ** -0.5
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(heads // kv, dim=2)) * scale
        if config.model_type == "bloom":  # ALiBi: a per-head linear bias over key positions
            from transformers.models.bloom.modeling_bloom import build_alibi_tensor

            alibi = build_alibi_tensor(torch.ones(2, seq, dtype=torch.long), heads, q.dtype)
            scores = scores + alibi.view(2, heads, 1, seq)
        cap = getattr(config, "attn_logit_softcapping", None)
        if cap:
            scores = torch.tanh(scores / cap) * cap
        recomputed = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        torch.testing.assert_close(recomputed.to(p.dtype), p, **tol)
    clean = model(X).logits
    with set_value(model, {f"layers.{graph.num_layers - 1}.attention_pattern": lambda cur: cur * 1.0}):
        explicit = model(X).logits
    torch.testing.assert_close(explicit, clean, rtol=1e-5, atol=1e-5)
    assert _attention_state(model, graph) == state


def check_pattern_mixes_values(model, graph, tol):
    """pattern · values (repeated over GQA groups) = attention_heads; the identity pattern makes
    attention_heads == values; zeroing the pattern zeroes attention_heads."""
    for i in range(graph.num_layers):
        v, p, z = layer_values(model, i, ("values", "attention_pattern", "attention_heads"))
        v = v.repeat_interleave(p.shape[1] // v.shape[2], dim=2)
        torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", p, v), z, **tol)
        eye = torch.eye(X.shape[1], dtype=p.dtype).expand_as(p)
        with set_value(model, {f"layers.{i}.attention_pattern": eye}):
            (z_eye,) = layer_values(model, i, ("attention_heads",))
        torch.testing.assert_close(z_eye, v, **tol)
        with set_value(model, {f"layers.{i}.attention_pattern": Zero()}):
            (z_zero,) = layer_values(model, i, ("attention_heads",))
        assert z_zero.abs().max() == 0


def check_qkv_writes(model, graph, tol):
    """Writes reach the scores: identical keys, or zero queries, give uniform causal rows (BLOOM: the
    softmax of its ALiBi bias alone); zero values zero the heads."""
    seq = X.shape[1]
    for i in range(graph.num_layers):
        k_same = lambda k: k[:, :1].expand_as(k).clone()  # noqa: E731
        for write in ({f"layers.{i}.keys": k_same}, {f"layers.{i}.queries": Zero()}):
            with set_value(model, write):
                (p,) = layer_values(model, i, ("attention_pattern",))
            bias = torch.zeros(1, 1, 1, seq, dtype=p.dtype)  # equal scores: only the position bias is left
            if model.config.model_type == "bloom":
                from transformers.models.bloom.modeling_bloom import build_alibi_tensor

                bias = build_alibi_tensor(torch.ones(1, seq, dtype=torch.long), p.shape[1], p.dtype)
                bias = bias.view(1, p.shape[1], 1, seq)
            allowed = _allowed(model.config, i, seq)
            expected = torch.softmax(bias.expand(1, p.shape[1], seq, seq).masked_fill(~allowed, float("-inf")), -1)
            torch.testing.assert_close(p, expected.expand_as(p), **tol)
    with set_value(model, {"layers.0.values": Zero()}):
        (z,) = layer_values(model, 0, ("attention_heads",))
    assert z.abs().max() == 0


ATTENTION_IDENTITIES = [check_attention_pattern, check_pattern_mixes_values, check_qkv_writes]


def _run_attention_identities(model):
    model(X, output_hidden_states=True)
    before = hook_ids(model)
    graph = SiteGraph.from_model(model)
    tol = A.tolerance(model)
    for identity in ATTENTION_IDENTITIES:
        identity(model, graph, tol)
    assert hook_ids(model) == before


@pytest.mark.parametrize("name", _attention_supported())
def test_attention_identities(name):
    """Under the model's default attention implementation (sdpa for most)."""
    _run_attention_identities(tiny(name))


@pytest.mark.parametrize("name", [n for n in _attention_supported()
                                  if _model_type(n) not in ("gemma2", "gpt_neo", "bloom")])
def test_attention_identities_under_eager(name):
    """The same model built with attn_implementation="eager" (gemma2 is eager already: sdpa refuses its
    soft-capping; gpt_neo and bloom compute attention inline whatever the implementation)."""
    import transformers as tf

    model = tiny(name)
    torch.manual_seed(0)
    eager = tf.AutoModelForCausalLM.from_config(A.config_for(name), attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    eager = eager.to(next(model.parameters()).dtype).eval()
    assert eager.config._attn_implementation == "eager"
    _run_attention_identities(eager)
