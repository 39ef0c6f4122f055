"""The primitives on models dispatched by accelerate (device maps, CPU and disk offload) equal the undispatched model.

Oracle: the same tiny model (same seeded float64 weights) kept whole in memory, without accelerate
(for the variants loaded with `from_pretrained`, the same saved directory loaded without a device map).
Every dispatched variant must give identical values, outputs and gradients; after
every call accelerate's own hooks (``_hf_hook``, the wrapped ``forward``) are exactly those it
installed, no torch hook is left, and offloaded weights are back on ``meta``. On a CPU-only machine
every execution device is ``cpu``; the ``cuda:0``/``cpu`` split runs where a GPU is present.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import accelerate
import pytest
import torch
import transformers as tf
from conftest import build, hook_ids, tokens

import interventions as iv
from interventions.dispatch import execution_device

BASE, SOURCE = tokens(2, 6, seed=51), tokens(2, 6, seed=52)
SOURCE2 = tokens(2, 6, seed=53)

# Embeddings and block 0 in memory, block 1 and the final norm offloaded to disk.
DEVICE_MAPS = {
    "gpt2": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
             "transformer.h.1": "disk", "transformer.ln_f": "disk", "lm_head": "cpu"},  # lm_head tied to wte
    "llama": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"},
}
BLOCK_CLASS = {"gpt2": "GPT2Block", "llama": "LlamaDecoderLayer"}
CUDA_MAPS = {  # executed on two devices: block 0 on the GPU, the rest on the CPU
    "gpt2": {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": 0, "transformer.h.1": "cpu",
             "transformer.ln_f": "cpu", "lm_head": 0},
    "llama": {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
              "model.norm": "cpu", "lm_head": "cpu"},
}
HOW = ["device_map", "cpu_offload", "disk_offload", "disk_offload_preload", "from_pretrained", "auto",
       "auto_all_disk", pytest.param("cuda_cpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def dispatched(family: str, how: str, tmp) -> torch.nn.Module:
    """The oracle's weights, dispatched by accelerate in one of the ways users do."""
    model = build(family)
    if how == "device_map":
        return accelerate.dispatch_model(model, DEVICE_MAPS[family], offload_dir=str(tmp / "offload"))
    if how == "cuda_cpu":
        return accelerate.dispatch_model(model, CUDA_MAPS[family], main_device="cpu")
    if how == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device="cpu")
    if how == "disk_offload":
        return accelerate.disk_offload(model, str(tmp / "offload"), execution_device="cpu")
    if how == "disk_offload_preload":  # whole blocks load at once: a forward cut short inside one must unload it
        return accelerate.disk_offload(model, str(tmp / "offload"), execution_device="cpu",
                                       preload_module_classes=[BLOCK_CLASS[family]])
    model.save_pretrained(tmp / "saved")
    if how == "from_pretrained":
        kwargs = {"device_map": DEVICE_MAPS[family]}
    else:  # device_map="auto" under a CPU budget: 70% of the weights puts the blocks on disk, 30% everything
        budget = (0.7 if how == "auto" else 0.3) * sum(p.numel() * p.element_size() for p in model.parameters())
        kwargs = {"device_map": "auto", "max_memory": {"cpu": int(budget)}}
    loaded = tf.AutoModelForCausalLM.from_pretrained(
        tmp / "saved", offload_folder=str(tmp / "offload"), dtype=torch.float64, **kwargs)
    assert "disk" in loaded.hf_device_map.values()
    loaded.config.use_cache = False
    return loaded.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def ref(request):
    return build(request.param)


@pytest.fixture(scope="module", params=HOW)
def pair(request, ref, tmp_path_factory):
    """(undispatched oracle, dispatched copy, family)."""
    family = ref.config.model_type
    tmp = tmp_path_factory.mktemp(f"{family}-{request.param}")
    model = dispatched(family, request.param, tmp)
    if (tmp / "saved").exists():  # the oracle is the same directory loaded without a device map: weights
        # read from a file sit at other addresses than built ones, where BLAS may round differently
        ref = tf.AutoModelForCausalLM.from_pretrained(tmp / "saved", dtype=torch.float64).eval()
        ref.config.use_cache = False
    return ref, model, family


def accelerate_state(model) -> dict:
    """Every accelerate hook and wrapped forward, and every torch hook: what our calls must leave unchanged."""
    return {
        "hf": {name: (id(m._hf_hook), id(m.__dict__.get("forward")))
               for name, m in model.named_modules() if hasattr(m, "_hf_hook")},
        "torch": hook_ids(model),
    }


def offloaded_loaded(model) -> list[str]:
    """Parameters of offloading hooks' modules that are not on meta (they must be between calls)."""
    out = []
    for name, m in model.named_modules():
        hook = getattr(m, "_hf_hook", None)
        if hook is not None and getattr(hook, "offload", False):
            out += [f"{name}.{p}" for p, t in m.named_parameters(recurse=hook.place_submodules)
                    if t.device.type != "meta"]
    return out


@pytest.fixture
def clean(pair):
    """Checks, after the test body, that the dispatched model is exactly as accelerate left it."""
    _, model, _ = pair
    before = accelerate_state(model)
    assert before["hf"], "the model is dispatched (accelerate hooks present)"
    yield
    assert accelerate_state(model) == before, "accelerate's hooks and torch hooks are unchanged"
    assert offloaded_loaded(model) == [], "offloaded weights are back on meta"


def runs_on(module) -> torch.device:
    """A module accelerate manages runs on its hook's device; one it manages only through its parts
    (cpu_offload and disk_offload hook only the modules holding weights) on the device those were given:
    execution_device="cpu" in every such variant here."""
    return execution_device(module) or torch.device("cpu")


def block(model, family, i):
    return model.transformer.h[i] if family == "gpt2" else model.model.layers[i]


def on_gpu(model) -> bool:
    return any(d is not None and d.type == "cuda" for d in map(execution_device, model.modules()))


def equal(model, a, b):
    """Bit-identical where everything runs on the CPU; with a GPU in the map, float64 rounding differs."""
    assert a.shape == b.shape
    if on_gpu(model):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-9, atol=1e-11)
    else:
        assert torch.equal(a.cpu(), b.cpu()), float((a.cpu() - b.cpu()).abs().max())


SITES = [
    "layers.0.input", "layers.1.input", iv.Site("layers.1.attention_heads", positions=[1, 4], heads=[0, 3]),
    "layers.1.attention_output", iv.Site("layers.1.mlp_output", dims=[0, 5]), "layers.0.output",
    "layers.1.output", iv.Site("logits", positions=[-1]),
    # attention internals (intercepted attention functions) and the other per-block sites
    iv.Site("layers.1.queries", heads=[1, 2]), "layers.1.keys", iv.Site("layers.1.attention_pattern", heads=[0]),
    "layers.0.residual_mid", "layers.1.mlp_hidden",
]


def test_dispatched_model_is_the_oracle(pair, clean):
    ref, model, _ = pair
    assert offloaded_loaded(model) == []
    equal(model, model(BASE).logits, ref(BASE).logits)


@pytest.mark.parametrize("site", SITES, ids=str)
def test_get_value(pair, clean, site):
    ref, model, _ = pair
    got, want = iv.get_value(model, BASE, [site])[site], iv.get_value(ref, BASE, [site])[site]
    equal(model, got, want)
    assert got.device.type != "meta"


def test_values_come_back_on_the_execution_device_of_their_module(pair, clean):
    _, model, _ = pair
    names = [f"layers.{i}.{kind}" for i in range(2) for kind in ("input", "attention_output", "output")]
    values = iv.get_value(model, BASE, names)
    graph = iv.SiteGraph.from_model(model)
    for name in names:
        device = runs_on(graph.point(name).module)
        assert values[name].device == device, (name, values[name].device, device)
    assert iv.get_value(model, BASE, ["logits"])["logits"].device == BASE.device  # where model() returns it


def test_set_value(pair, clean):
    ref, model, _ = pair
    value = torch.randn(2, 2, 16, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    values = {iv.Site("layers.1.input", positions=[0, 3]): value,  # float32: cast (and moved) to the site's
              iv.Site("layers.1.attention_heads", heads=[1]): iv.Zero(),
              "layers.0.mlp_output": iv.Add(torch.ones(16), scale=0.5)}
    equal(model, iv.set_value(model, values, inputs=BASE).logits, iv.set_value(ref, values, inputs=BASE).logits)
    with iv.set_value(model, values):
        got = model(BASE).logits
    equal(model, got, iv.set_value(ref, values, inputs=BASE).logits)


@pytest.mark.parametrize("in_batch", [False, True])
def test_interchange(pair, clean, in_batch):
    ref, model, _ = pair
    sites = [iv.Site("layers.0.output", positions=[2]), iv.Site("layers.1.attention_heads", heads=[2])]
    for kwargs in ({"sources": SOURCE, "sites": sites},
                   {"sources": [SOURCE, SOURCE2], "sites": [sites[:1], ["layers.1.mlp_output"]],
                    "source_sites": [[iv.Site("layers.0.input", positions=[4])], ["layers.1.mlp_output"]]}):
        got = iv.interchange(model, BASE, in_batch=in_batch, **kwargs).logits
        equal(model, got, iv.interchange(ref, BASE, in_batch=in_batch, **kwargs).logits)


@pytest.mark.parametrize("layers", [None, [0], [1]])
def test_patching_sweep(pair, clean, layers):
    ref, model, _ = pair
    with torch.no_grad():
        got = iv.patching_sweep(model, BASE[:1], SOURCE[:1], layers=layers, positions=[0, 3, 5])
        want = iv.patching_sweep(ref, BASE[:1], SOURCE[:1], layers=layers, positions=[0, 3, 5])
    equal(model, got, want)
    assert got.device == BASE.device  # where the model returns its logits, wherever its head runs


def test_patching_sweep_of_heads_over_a_batch_with_a_metric(pair, clean):
    ref, model, _ = pair
    metric = lambda at_readout: (at_readout[:, 1] - at_readout[:, 2]).mean()  # noqa: E731
    with torch.no_grad():
        got = iv.patching_sweep(model, BASE, SOURCE, layers=[1], site="attention_heads", metric=metric)
        want = iv.patching_sweep(ref, BASE, SOURCE, layers=[1], site="attention_heads", metric=metric)
    equal(model, got, want)


def test_record_and_replay_keep_each_block_on_its_device(pair, clean):
    ref, model, family = pair
    with torch.no_grad():
        with iv.record_blocks(model) as recording:
            clean_logits = model(BASE).logits
        for i in range(2):
            assert recording.value(i).device == runs_on(block(model, family, i))
        site = iv.Site("layers.0.output", positions=[1])
        source_value = iv.get_value(model, SOURCE, [site])[site]
        with iv.replay_blocks(model, recording, upto=0):  # block 0 returns its recorded output
            patched = iv.set_value(model, {site: source_value}, inputs=BASE).logits
        want = iv.interchange(ref, BASE, SOURCE, site).logits
    equal(model, clean_logits, ref(BASE).logits)
    equal(model, patched, want)


def test_gradients_through_an_interchange(pair, clean):
    ref, model, _ = pair
    das = iv.RotatedSubspace(16, subspace=4).double()
    value = torch.randn(2, 1, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = []
    for m in (ref, model):
        das.zero_grad()
        v = value.clone().requires_grad_()
        with iv.set_value(m, {iv.Site("layers.0.output", positions=[5]): v}):
            out = iv.interchange(m, BASE, SOURCE, iv.Site("layers.1.output", positions=[1, 2]), intervention=das)
        out.logits.pow(2).mean().backward()
        grads.append((v.grad, das.rotation.linear.parametrizations.weight.original.grad.clone()))
    for got, want in zip(grads[1], grads[0]):
        equal(model, got, want)
        assert want.abs().sum() > 0


def test_value_and_grad_and_attribution_patching(pair, clean):
    ref, model, _ = pair
    sites = ["layers.0.output", iv.Site("layers.1.attention_heads", heads=[1]), "layers.1.input",
             iv.Site("layers.1.attention_pattern", heads=[0, 3])]

    def metric(logits):
        return (logits[:, -1, 3] - logits[:, -1, 7]).mean()

    got, want = iv.value_and_grad(model, BASE, sites, metric), iv.value_and_grad(ref, BASE, sites, metric)
    equal(model, got.metric, want.metric)
    for site in sites:
        equal(model, got.values[site], want.values[site])
        equal(model, got.grads[site], want.grads[site])
        assert want.grads[site].abs().sum() > 0
        # the same selection as get_value's; not bit-identical: a pattern site switches that attention to the
        # explicit softmax, and Llama's RMSNorm computes in float32
        torch.testing.assert_close(got.values[site].cpu(), iv.get_value(ref, BASE, [site])[site], rtol=1e-5, atol=1e-6)
    got = iv.attribution_patching(model, BASE, SOURCE, sites[:3], metric)
    want = iv.attribution_patching(ref, BASE, SOURCE, sites[:3], metric)
    for site in sites[:3]:
        equal(model, got[site], want[site])


def test_set_value_on_attention_internals(pair, clean):
    ref, model, _ = pair
    pattern = torch.full((2, 1, 6, 6), 1 / 6, dtype=torch.float32)  # uniform attention for head 2
    values = {iv.Site("layers.1.attention_pattern", heads=[2]): pattern, iv.Site("layers.0.values", heads=[0]): iv.Zero()}
    equal(model, iv.set_value(model, values, inputs=BASE).logits, iv.set_value(ref, values, inputs=BASE).logits)
    site = iv.Site("layers.1.queries", positions=[2, 5])
    equal(model, iv.interchange(model, BASE, SOURCE, site).logits, iv.interchange(ref, BASE, SOURCE, site).logits)


def counterfactuals(model_ref, n=8):
    """A DAS dataset: the label is the oracle's next token after interchanging block 0's first 4 dims."""
    base, source = tokens(n, 5, seed=61), tokens(n, 5, seed=62)
    site = iv.Site("layers.0.output", positions=[-1], dims=[0, 1, 2, 3])
    with torch.no_grad():
        labels = iv.interchange(model_ref, base, source, site).logits[:, -1].argmax(-1)
    ds = iv.CounterfactualDataset(base={}, sources=({},), variables=(("X",),), labels=labels,
                                  base_labels=labels, base_inputs=base, source_inputs=(source,))
    return ds, iv.Alignment({"X": site})


def test_das_training(pair, clean):
    ref, model, _ = pair
    data, alignment = counterfactuals(ref)
    start = iv.Rotation(16).double()
    trained = []
    for m in (ref, model):
        m.zero_grad(set_to_none=True)  # other tests backpropagate into the shared models
        rotation = copy.deepcopy(start)
        opt = torch.optim.Adam(rotation.parameters(), lr=0.05)
        for _ in range(3):
            loss = iv.das_loss(m, data, alignment, rotation=rotation, logits=lambda out: out.logits[:, -1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert all(p.grad is None for p in m.parameters()), "the network stays frozen"
        assert all(p.requires_grad for p in m.parameters()), "requires_grad is restored"
        trained.append(rotation.weight.detach())
    assert not torch.equal(trained[0], start.weight.detach()), "training moved the rotation"
    equal(model, trained[1], trained[0])


def test_errors_inside_offloaded_blocks_leave_nothing_behind(pair, clean):
    ref, model, _ = pair
    with pytest.raises(iv.ShapeError):
        iv.set_value(model, {"layers.1.mlp_output": lambda x: x[:, :1]}, inputs=BASE)
    with pytest.raises(iv.InterventionError):
        iv.interchange(model, BASE, SOURCE, "layers.1.attention_output", intervention=lambda b, s: s[..., :3])
    equal(model, model(BASE).logits, ref(BASE).logits)  # and the model still runs, unchanged


def test_the_docs_example_runs():
    """docs/dispatch.md's example, as written (a tiny Llama saved and reloaded with blocks on disk)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "dispatch.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    scope: dict = {}
    exec(compile(block, "docs/dispatch.md", "exec"), scope)
    assert scope["values"]["layers.1.output"].device == torch.device("cpu")
    assert scope["model"].model.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert scope["out"].logits.shape == (2, 8, 100)
