"""Every family table against the model's own hidden states and its own weights; unknown models.

For each supported family (tiny configs): block outputs equal ``output_hidden_states``, the
residual algebra of the sublayer sites holds, heads feed the output projection, a whole last-layer
interchange gives the source's logits, and the SiteGraph is a DAG listed in topological order.
"""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import VOCAB, build, randomise, tokens
from torch import nn

from interventions import (
    InterventionError,
    SelectorError,
    Site,
    SiteGraph,
    UnknownSiteError,
    Zero,
    get_value,
    interchange,
    set_value,
)

TOL = {"rtol": 1e-5, "atol": 1e-6}
LAYERS = 3
KINDS = ("input", "attention_heads", "attention_output", "mlp_output", "output")
ALL_KINDS = ("input", "queries", "keys", "values", "attention_pattern", "attention_heads", "attention_output",
             "residual_mid", "mlp_hidden", "mlp_output", "output")
COMMON = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
              "intermediate_size": 24, "max_position_embeddings": 40}

# family -> (model class, config, final norm path applied to the last hidden state, residual kind)
FAMILIES = {
    "gpt2": (tf.GPT2LMHeadModel, lambda: tf.GPT2Config(
        n_layer=LAYERS, n_embd=16, n_head=4, n_inner=24, vocab_size=VOCAB, n_positions=40), "transformer.ln_f", "pre"),
    "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**COMMON, num_key_value_heads=2), "model.norm", "pre"),
    "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(**COMMON, num_key_value_heads=2), "model.norm", "pre"),
    "opt": (tf.OPTForCausalLM, lambda: tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=4, ffn_dim=24,
        max_position_embeddings=40, word_embed_proj_dim=16), "model.decoder.final_layer_norm", "pre"),
    "gpt_neox": (tf.GPTNeoXForCausalLM, lambda: tf.GPTNeoXConfig(**COMMON, use_parallel_residual=True),
                 "gpt_neox.final_layer_norm", "pre"),
    "bert": (tf.BertForMaskedLM, lambda: tf.BertConfig(**COMMON), None, "bert"),
    "roberta": (tf.RobertaForMaskedLM, lambda: tf.RobertaConfig(**COMMON, pad_token_id=1), None, "bert"),
    "distilbert": (tf.DistilBertForMaskedLM, lambda: tf.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=LAYERS, n_heads=4, hidden_dim=24, max_position_embeddings=40),
        None, "distilbert"),
}

BASE = tokens(2, 7, seed=11).clamp(min=2)  # RoBERTa: avoid its padding id 1
SOURCE = tokens(2, 7, seed=12).clamp(min=2)


def make(name: str) -> nn.Module:
    cls, config, *_ = FAMILIES[name]
    torch.manual_seed(0)
    return randomise(cls(config()), seed=1).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, make(request.param)


def test_layers_equal_hidden_states(family):
    name, model = family
    _, _, final_norm, _ = FAMILIES[name]
    ref = model(BASE, output_hidden_states=True).hidden_states
    assert len(ref) == LAYERS + 1
    sites = ["layers.0.input"] + [f"layers.{i}.output" for i in range(LAYERS)]
    got = get_value(model, BASE, sites)
    torch.testing.assert_close(got["layers.0.input"], ref[0], **TOL)
    for i in range(LAYERS - 1):
        torch.testing.assert_close(got[f"layers.{i}.output"], ref[i + 1], **TOL)
        torch.testing.assert_close(get_value(model, BASE, f"layers.{i + 1}.input")[f"layers.{i + 1}.input"],
                                   ref[i + 1], **TOL)
    last = got[f"layers.{LAYERS - 1}.output"]
    if final_norm is not None:  # pre-LN decoders report the last hidden state after their final norm
        last = model.get_submodule(final_norm)(last)
    torch.testing.assert_close(last, ref[LAYERS], **TOL)


def block_output(name: str, block: nn.Module, x, attn, mlp):
    """A block's output from its input and sublayer sites, by the family's residual form."""
    kind = FAMILIES[name][3]
    if kind == "pre":  # pre-LN, or GPT-NeoX's parallel residual: both sublayers add to the stream
        return x + attn + mlp
    n1, n2 = ((block.attention.output.LayerNorm, block.output.LayerNorm) if kind == "bert"
              else (block.sa_layer_norm, block.output_layer_norm))
    mid = F.layer_norm(x + attn, (16,), n1.weight, n1.bias, n1.eps)
    return F.layer_norm(mid + mlp, (16,), n2.weight, n2.bias, n2.eps)


def test_sublayer_sites_obey_the_residual_algebra(family):
    """output = input + attention + mlp (pre-LN / parallel), or the post-LN form with the block's norms."""
    name, model = family
    graph = SiteGraph.from_model(model)
    for i in range(LAYERS):
        v = get_value(model, BASE, [f"layers.{i}.{k}" for k in KINDS])
        x, heads, attn, mlp, out = (v[f"layers.{i}.{k}"] for k in KINDS)
        assert heads.shape == (2, 7, 4, 4) and mlp.shape == attn.shape == (2, 7, 16)
        # the per-head result is the output projection's input, and attention_output is its output
        proj = graph.point(f"layers.{i}.attention_heads").module
        flat = heads.reshape(2, 7, 16)
        expected = F.linear(flat, proj.weight, proj.bias) if isinstance(proj, nn.Linear) else \
            flat @ proj.weight + proj.bias  # GPT-2's Conv1D keeps weights as [in, out]
        torch.testing.assert_close(attn, expected, **TOL)
        block = model.get_submodule(graph.layers_path)[i]
        torch.testing.assert_close(out, block_output(name, block, x, attn, mlp), **TOL)


def test_setting_a_sublayer_moves_the_block_output(family):
    """Zeroing mlp_output at one position changes that position's block output as the residual form says."""
    name, model = family
    graph = SiteGraph.from_model(model)
    names = [f"layers.1.{k}" for k in KINDS]
    with set_value(model, {Site("layers.1.mlp_output", positions=[2]): Zero()}):
        v = get_value(model, BASE, names)  # read after the edit (same forward)
    x, _, attn, mlp, out = (v[n] for n in names)
    clean = get_value(model, BASE, "layers.1.mlp_output")["layers.1.mlp_output"]
    assert torch.equal(mlp[:, 2], torch.zeros_like(mlp[:, 2]))
    torch.testing.assert_close(mlp[:, [0, 1, 3, 4, 5, 6]], clean[:, [0, 1, 3, 4, 5, 6]], **TOL)
    block = model.get_submodule(graph.layers_path)[1]
    torch.testing.assert_close(out, block_output(name, block, x, attn, mlp), **TOL)


def test_last_layer_interchange_gives_the_source_logits(family):
    _, model = family
    got = interchange(model, BASE, SOURCE, f"layers.{LAYERS - 1}.output").logits
    torch.testing.assert_close(got, model(SOURCE).logits, **TOL)
    assert not torch.allclose(model(BASE).logits, model(SOURCE).logits)


def test_site_graph_is_a_dag_in_computation_order(family):
    name, model = family
    graph = SiteGraph.from_model(model)
    parallel = name == "gpt_neox"  # use_parallel_residual: the MLP reads the block input
    no_mid = parallel or FAMILIES[name][3] != "pre"  # parallel, or a post-LN encoder
    kinds = [k for k in ALL_KINDS if not (k == "residual_mid" and no_mid)]
    expected = [f"layers.{i}.{k}" for i in range(LAYERS) for k in kinds] + ["final_norm", "logits"]
    assert graph.sites == expected
    assert graph.num_layers == LAYERS and graph.num_heads == 4 and graph.hidden_size == 16
    assert SiteGraph.from_model(model) is graph  # cached
    g = graph.graph
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert set(g.nodes) == set(expected)
    assert all(graph.order(u) < graph.order(v) for u, v in g.edges)  # .sites is a topological order
    assert list(nx.lexicographical_topological_sort(g, key=graph.order)) == expected
    assert nx.is_weakly_connected(g)
    assert graph.precedes("layers.0.input", "logits") and not graph.precedes("logits", "layers.0.input")
    assert graph.precedes("layers.1.attention_heads", "layers.1.attention_output")
    assert graph.precedes("layers.1.attention_output", "layers.1.mlp_output") is not parallel
    for site in expected:
        assert site in graph
    assert "layers.9.output" not in graph


# -- models without a family table ----------------------------------------------------------------
class BlocksConfig(tf.PreTrainedConfig):
    model_type = "tiny_blocks_for_tests"

    def __init__(self, hidden: int = 6, blocks: int = 3, **kwargs):
        self.hidden, self.blocks = hidden, blocks
        super().__init__(**kwargs)


class Block(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class BlocksModel(tf.PreTrainedModel):
    """A Hugging Face model the library has no table for: embeddings, then a ModuleList of blocks."""

    config_class = BlocksConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(VOCAB, config.hidden)
        self.blocks = nn.ModuleList(Block(config.hidden) for _ in range(config.blocks))
        self.post_init()

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return h


def test_unknown_hf_model_gets_block_sites_with_a_warning():
    torch.manual_seed(0)
    model = BlocksModel(BlocksConfig()).eval()
    with pytest.warns(UserWarning, match="blocks"):
        got = get_value(model, BASE, ["layers.0.input", "layers.1.input", "layers.2.output"])
    h = model.embed.weight[BASE]  # by hand
    expected = {"layers.0.input": h}
    for i, block in enumerate(model.blocks):
        if i:
            expected[f"layers.{i}.input"] = h
        h = h + torch.tanh(h @ block.lin.weight.T + block.lin.bias)
        expected[f"layers.{i}.output"] = h
    for site, value in got.items():
        torch.testing.assert_close(value, expected[site], **TOL)
    graph = SiteGraph.from_model(model)
    assert graph.sites == [f"layers.{i}.{k}" for i in range(3) for k in ("input", "output")]
    with pytest.raises(UnknownSiteError, match="module:"):
        get_value(model, BASE, "layers.0.attention_heads")
    with pytest.raises(UnknownSiteError):
        get_value(model, BASE, "layers.3.output")
    patched = set_value(model, {Site("layers.1.output", positions=[2]): Zero()}, inputs=BASE)
    expected_out = expected["layers.2.output"].clone()
    h = expected["layers.1.output"].clone()
    h[:, 2] = 0
    blk = model.blocks[2]
    torch.testing.assert_close(patched, h + torch.tanh(h @ blk.lin.weight.T + blk.lin.bias), **TOL)
    assert not torch.allclose(patched, expected_out)


def test_known_architecture_with_an_unknown_model_type_is_detected():
    model = build("gpt2", torch.float32)
    model.config.model_type = "gpt2_renamed_for_tests"
    with pytest.warns(UserWarning, match="transformer.h"):
        graph = SiteGraph.from_model(model)
    assert graph.family is None and graph.num_layers == 2 and "logits" in graph
    ref = model(BASE, output_hidden_states=True).hidden_states
    got = get_value(model, BASE, ["layers.0.input", "layers.0.output"])
    torch.testing.assert_close(got["layers.0.input"], ref[0], **TOL)
    torch.testing.assert_close(got["layers.0.output"], ref[1], **TOL)


def test_plain_torch_module_works_through_module_paths():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    w1, b1, w2, b2 = mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias
    pre = x @ w1.T + b1
    hidden = pre.clamp(min=0)

    got = get_value(mlp, x, ["module:0", Site("module:1", dims=[1, 6]), "module:2:input"])
    torch.testing.assert_close(got["module:0"], pre, **TOL)
    torch.testing.assert_close(got[Site("module:1", dims=[1, 6])], hidden[:, [1, 6]], **TOL)
    torch.testing.assert_close(got["module:2:input"], hidden, **TOL)

    out = set_value(mlp, {Site("module:1", dims=slice(0, 4)): Zero()}, inputs=x)
    h = hidden.clone()
    h[:, :4] = 0
    torch.testing.assert_close(out, h @ w2.T + b2, **TOL)

    source = torch.randn(5, 4, dtype=torch.float64)
    src_hidden = (source @ w1.T + b1).clamp(min=0)
    out = interchange(mlp, x, source, Site("module:2:input", dims=[0, 2, 5]))
    h = hidden.clone()
    h[:, [0, 2, 5]] = src_hidden[:, [0, 2, 5]]
    torch.testing.assert_close(out, h @ w2.T + b2, **TOL)

    graph = SiteGraph.from_model(mlp)
    assert graph.sites == [] and "module:1" in graph and "module:1:input" in graph
    for bad in ("layers.0.output", "logits"):
        with pytest.raises(UnknownSiteError, match="module:") as err:
            get_value(mlp, x, bad)
        assert isinstance(err.value, InterventionError)
    with pytest.raises(UnknownSiteError, match="no module '5'"):
        get_value(mlp, x, "module:5")
    with pytest.raises(SelectorError):  # a 2-D value has no positions
        get_value(mlp, x, Site("module:0", positions=[0]))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_from_pretrained_round_trip(tmp_path, name):
    model = build(name, torch.float32)
    model.save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded is not model and SiteGraph.from_model(loaded) is not SiteGraph.from_model(model)
    sites = [Site("layers.1.attention_heads", positions=[3], heads=[1, 2]), "layers.0.mlp_output", "logits"]
    want, got = get_value(model, BASE, sites), get_value(loaded, BASE, sites)
    assert list(got) == list(want)
    for site in want:
        torch.testing.assert_close(got[site], want[site], **TOL)
