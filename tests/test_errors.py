"""Bad input: one exception family, actionable messages, raised before the model runs, no stray hooks."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

import interventions as iv


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=50, n_positions=32)
    return T.GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def calls(gpt2):
    """Counts forward calls of the model's embedding (the first module any forward touches)."""
    counter = {"n": 0}
    handle = gpt2.transformer.wte.register_forward_pre_hook(lambda *a: counter.__setitem__("n", counter["n"] + 1))
    yield counter
    handle.remove()


def hook_ids(model):
    return {(n, k) for n, m in model.named_modules() for k in (*m._forward_hooks, *m._forward_pre_hooks)}


X = torch.randint(0, 50, (2, 6))


def expect(exc, match, fn, model, calls):
    before = hook_ids(model)
    with pytest.raises(exc, match=match):
        fn()
    assert calls["n"] == 0, "the model ran before the bad input was reported"
    assert hook_ids(model) == before


def test_unknown_site_lists_nearest_names(gpt2, calls):
    expect(iv.UnknownSiteError, r"Nearest valid names: layers\.1\.output",
           lambda: iv.get_value(gpt2, X, "layers.1.outptu"), gpt2, calls)


def test_unknown_layer_index(gpt2, calls):
    expect(iv.UnknownSiteError, r"layers\.\{0\.\.1\}", lambda: iv.get_value(gpt2, X, "layers.7.output"), gpt2, calls)


def test_unknown_module_path(gpt2, calls):
    expect(iv.UnknownSiteError, r"Nearest module paths: transformer\.h\.0\.mlp",
           lambda: iv.get_value(gpt2, X, "module:transformer.h.0.mpl"), gpt2, calls)


def test_heads_on_a_site_without_heads(gpt2, calls):
    expect(iv.SelectorError, "has no heads",
           lambda: iv.get_value(gpt2, X, iv.Site("layers.0.output", heads=[0])), gpt2, calls)


def test_heads_out_of_range(gpt2, calls):
    expect(iv.SelectorError, r"valid 0\.\.3",
           lambda: iv.get_value(gpt2, X, iv.Site("layers.0.attention_heads", heads=[4])), gpt2, calls)


@pytest.mark.parametrize("dims", [[16], slice(8, 20), [-17]])
def test_dims_out_of_range(gpt2, calls, dims):
    expect(iv.SelectorError, "size 16",
           lambda: iv.get_value(gpt2, X, iv.Site("layers.0.output", dims=dims)), gpt2, calls)


def test_position_out_of_range(gpt2, calls):
    expect(iv.SelectorError, r"6 positions \(valid 0\.\.5",
           lambda: iv.get_value(gpt2, X, iv.Site("layers.0.output", positions=[6])), gpt2, calls)


def test_per_example_positions_out_of_range_and_wrong_batch(gpt2, calls):
    expect(iv.SelectorError, "out of range",
           lambda: iv.get_value(gpt2, X, iv.Site("layers.0.output", positions=torch.tensor([[0], [9]]))),
           gpt2, calls)
    expect(iv.SelectorError, "3 rows; the inputs have batch size 2",
           lambda: iv.get_value(gpt2, X, iv.Site("layers.0.output", positions=torch.zeros(3, 1, dtype=torch.long))),
           gpt2, calls)


def test_position_on_padding(gpt2, calls):
    mask = torch.ones_like(X)
    mask[1, 4:] = 0
    inputs = {"input_ids": X, "attention_mask": mask}
    expect(iv.SelectorError, "example 1 position 5",
           lambda: iv.interchange(gpt2, inputs, inputs, iv.Site("layers.0.output", positions=[5])), gpt2, calls)


def test_value_of_wrong_shape(gpt2, calls):
    site = iv.Site("layers.1.output", positions=[0, 1])
    expect(iv.ShapeError, r"shape \(2, 3, 16\).*shape \(2, 2, 16\)",
           lambda: iv.set_value(gpt2, {site: torch.zeros(2, 3, 16)}, inputs=X), gpt2, calls)


def test_value_of_wrong_shape_in_context_manager_leaves_no_hooks(gpt2):
    before = hook_ids(gpt2)
    with pytest.raises(iv.ShapeError, match="has shape"):
        with iv.set_value(gpt2, {"layers.1.output": torch.zeros(2, 3, 16)}):
            gpt2(X)
    assert hook_ids(gpt2) == before


def test_value_not_a_tensor(gpt2, calls):
    expect(iv.InterventionError, "must be a tensor or a callable",
           lambda: iv.set_value(gpt2, {"layers.1.output": [1, 2]}, inputs=X), gpt2, calls)


def test_unsupported_model_says_how_to_use_module_paths():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(iv.UnknownSiteError, match=r"'module:<dotted\.path>'.*e\.g\. 0, 1, 2"):
        iv.get_value(mlp, torch.zeros(1, 4), "layers.0.output")
    got = iv.get_value(mlp, torch.ones(1, 4), "module:1")["module:1"]
    assert torch.equal(got, torch.relu(mlp[0](torch.ones(1, 4))))


def test_not_a_module():
    with pytest.raises(iv.UnsupportedModelError, match="torch.nn.Module"):
        iv.get_value(lambda x: x, torch.zeros(1), "layers.0.output")


def test_positions_on_a_site_without_sequence_axis():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with pytest.raises(iv.SelectorError, match="no sequence axis"):
        iv.get_value(mlp, torch.zeros(3, 4), iv.Site("module:0", positions=[0]))


def test_interchange_structure_errors(gpt2, calls):
    other = torch.randint(0, 50, (3, 6))
    expect(iv.ShapeError, "batch size 3; the base has 2",
           lambda: iv.interchange(gpt2, X, other, "layers.0.output"), gpt2, calls)
    expect(iv.InterventionError, "with 2 sources, sites must be a list of 2",
           lambda: iv.interchange(gpt2, X, [X, X], "layers.0.output"), gpt2, calls)
    expect(iv.SelectorError, "selects 1 positions in the base but its source site selects 2",
           lambda: iv.interchange(gpt2, X, X, iv.Site("layers.0.output", positions=[0]),
                                  source_sites=iv.Site("layers.0.output", positions=[0, 1])), gpt2, calls)
    expect(iv.InterventionError, "pair one-to-one",
           lambda: iv.interchange(gpt2, X, X, ["layers.0.output"], source_sites=["layers.0.output"] * 2),
           gpt2, calls)
    expect(iv.InterventionError, "must be callable",
           lambda: iv.interchange(gpt2, X, X, "layers.0.output", intervention=3), gpt2, calls)
    expect(iv.InterventionError, "tensor or a mapping",
           lambda: iv.get_value(gpt2, [1, 2, 3], "layers.0.output"), gpt2, calls)


def test_in_batch_needs_equal_shapes_and_source_not_later(gpt2, calls):
    short = torch.randint(0, 50, (2, 4))
    expect(iv.ShapeError, "equal shapes",
           lambda: iv.interchange(gpt2, X, short, iv.Site("layers.0.output", positions=[0]), in_batch=True),
           gpt2, calls)
    expect(iv.InterventionError, "no later than the base site",
           lambda: iv.interchange(gpt2, X, X, "layers.0.output", source_sites="layers.1.output", in_batch=True),
           gpt2, calls)


def test_source_free_intervention_needs_no_source_but_replace_does(gpt2):
    with pytest.raises(iv.InterventionError, match="needs a source value"):
        iv.set_value(gpt2, {"layers.0.output": iv.Replace()}, inputs=X)


def test_exception_inside_intervention_leaves_no_hooks(gpt2):
    before = hook_ids(gpt2)

    def boom(base, source):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        iv.interchange(gpt2, X, X, "layers.1.mlp_output", intervention=boom)
    assert hook_ids(gpt2) == before


@pytest.mark.parametrize("kwargs, match", [
    ({"name": ""}, "non-empty string"),
    ({"name": "layers.0.output", "positions": []}, "must not be empty"),
    ({"name": "layers.0.output", "positions": torch.zeros(2, 2)}, "integer tensor"),
    ({"name": "layers.0.output", "dims": slice(0, 8, 2)}, "step 1"),
    ({"name": "layers.0.output", "heads": "ab"}, "list of ints"),
])
def test_bad_site_construction(kwargs, match):
    with pytest.raises(iv.SelectorError, match=match):
        iv.Site(**kwargs)


@pytest.mark.parametrize("subspace, match", [
    (99, r"subspace size must be in 1\.\.16"),  # the bug: clamped silently to the whole space
    (0, r"subspace size must be in 1\.\.16"),
    (slice(4, 40), "non-empty slice of 0..16"),
    (slice(8, 8), "non-empty slice of 0..16"),
    ("4", "an int .* or a slice"),
])
def test_rotated_subspace_out_of_range_is_refused(subspace, match):
    with pytest.raises(iv.InterventionError, match=match):
        iv.RotatedSubspace(16, subspace)
    assert iv.RotatedSubspace(16, slice(12, 16)).subspace == slice(12, 16)
