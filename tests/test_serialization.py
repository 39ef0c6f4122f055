"""Saving and loading interventions (a fresh process reproduces the outputs to 1e-6; shared rotations stay
shared; damaged files are clear errors), LowRankRotatedSubspace's storage, and Alignment <-> JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hook_ids, tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from saved_user_interventions import GatedMix, outputs

import interventions as iv
from interventions import AlignmentError, InterventionError, Site
from interventions.serialization import site_from_json

ROOT = Path(__file__).resolve().parents[1]
from saved_user_interventions import SIZE


def trained(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A few SGD steps on a random objective: parameters move away from their initial values."""
    gen = torch.Generator().manual_seed(seed)
    base, source, target = (torch.randn(4, SIZE, generator=gen) for _ in range(3))
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        (module(base, source) * target).sum().backward()
        opt.step()
    return module


def examples():
    """A mix of every built-in type, a shared Rotation and a user subclass, keyed by sites with selectors."""
    das = trained(iv.RotatedSubspace(SIZE, 4), 1).double()
    shared = das.with_subspace(slice(4, 7))
    low = trained(iv.LowRankRotatedSubspace(SIZE, 3), 2).double()
    user = trained(
        GatedMix(
            SIZE,
            rotation=das.rotation,
            dims=[0, 5],
            init_gate=0.5,
            offset=torch.arange(SIZE, dtype=torch.float32),
        ),
        3,
    ).double()
    return {
        Site("layers.0.output", positions=[1, 3], dims=slice(0, SIZE)): das,
        Site("layers.1.output", positions=torch.tensor([[0], [2]])): shared,
        Site("layers.1.attention_heads", heads=[0, 2]): iv.Zero(),
        "layers.0.mlp_output": low,
        Site("layers.0.attention_output", dims=[1, 2]): iv.Constant.mean_of(
            torch.randn(5, 2, dtype=torch.float64)
        ),
        "layers.1.mlp_output": iv.Add(torch.randn(SIZE), scale=0.5, trainable=True),
        Site("layers.0.input", positions=[2]): user,
        "layers.1.input": iv.RotatedDims(das.rotation, [2, 3]),
        "logits": iv.Replace(),
    }


FRESH = r"""
import json, sys, torch
from safetensors.torch import save_file
from interventions.serialization import site_to_json
import interventions as iv
import saved_user_interventions  # the user's class registers itself on import
from saved_user_interventions import outputs
loaded = iv.load_interventions(sys.argv[1])
items = list(loaded.values())
assert items[0].rotation is items[1].rotation is items[6].rotation is items[7].rotation
out = outputs(loaded)
sites = json.dumps([site_to_json(k) for k in loaded])
save_file(out, sys.argv[2], metadata={"sites": sites})
"""


def test_a_fresh_process_reproduces_every_output(tmp_path):
    saved = examples()
    iv.save_interventions(tmp_path / "saved", saved)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "HF_HUB_OFFLINE": "1",
    }
    run = subprocess.run(
        [sys.executable, "-c", FRESH, str(tmp_path / "saved"), str(tmp_path / "out.safetensors")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got, want = load_file(str(tmp_path / "out.safetensors")), outputs(saved)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        sites = [site_from_json(s) for s in json.loads(f.metadata()["sites"])]
    assert sites == [iv.serialization.as_site(s) for s in saved]  # same sites (selectors too), same order
    assert set(got) == set(want)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, atol=1e-6, rtol=0)
        assert got[key].dtype == w.dtype


def test_in_process_round_trip_keeps_sites_classes_sharing_and_training_state(tmp_path, gpt2):
    saved = examples()
    loaded = iv.load_interventions(iv.save_interventions(tmp_path, saved))
    assert list(loaded) == list(saved)
    assert [type(m) for m in loaded.values()] == [type(m) for m in saved.values()]
    das, shared, user = loaded[list(saved)[0]], loaded[list(saved)[1]], loaded[list(saved)[6]]
    assert das.rotation is shared.rotation is user.rotation
    assert shared.subspace == slice(4, 7) and user.dims == [0, 5]
    assert loaded["layers.1.mlp_output"].vector.requires_grad and loaded["layers.1.mlp_output"].scale == 0.5
    # the shared rotation is still trainable as one object
    das.rotation.linear.parametrizations.weight.original.grad = None
    (das.rotation.weight.sum() + user.rotation.weight.sum()).backward()
    assert das.rotation.linear.parametrizations.weight.original.grad is not None
    # on a model: the same interchange output with the saved and the loaded DAS intervention
    before = hook_ids(gpt2)
    site = Site("layers.0.output", positions=[1, 3])
    base, source = tokens(2, 5, 1), tokens(2, 5, 2)
    torch.testing.assert_close(
        iv.interchange(gpt2, base, source, site, intervention=das).logits,
        iv.interchange(gpt2, base, source, site, intervention=saved[list(saved)[0]]).logits,
    )
    assert hook_ids(gpt2) == before


def test_low_rank_stores_and_saves_only_the_k_rows(tmp_path):
    low = trained(iv.LowRankRotatedSubspace(SIZE, 3), 5)
    assert {k: tuple(v.shape) for k, v in low.state_dict().items()} == {
        "rotation.linear.parametrizations.weight.original": (3, SIZE)
    }
    assert sum(b.numel() for b in low.buffers()) == 0
    iv.save_interventions(tmp_path, {"layers.0.output": low})
    tensors = load_file(str(tmp_path / "tensors.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == 3 * SIZE
    again = iv.load_interventions(tmp_path)["layers.0.output"]
    torch.testing.assert_close(again.rotation.weight, low.rotation.weight, atol=1e-7, rtol=0)
    w = again.rotation.weight
    torch.testing.assert_close(w @ w.T, torch.eye(3), atol=1e-6, rtol=0)


def test_low_rank_reads_a_state_saved_with_the_former_square_base():
    torch.manual_seed(3)
    legacy = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(SIZE, 3, bias=False))  # old storage
    old_state = {f"rotation.linear.{k}": v for k, v in legacy.state_dict().items()}
    assert old_state["rotation.linear.parametrizations.weight.0.base"].shape == (SIZE, SIZE)
    low = iv.LowRankRotatedSubspace(SIZE, 3)
    low.load_state_dict(old_state)
    torch.testing.assert_close(low.rotation.weight, legacy.weight, atol=1e-6, rtol=0)
    assert list(low.state_dict()) == ["rotation.linear.parametrizations.weight.original"]


def test_user_subclasses_register_themselves():
    assert iv.registry.registered()["tests.GatedMix"] is GatedMix
    assert iv.registry.registered()["RotatedSubspace"] is iv.RotatedSubspace

    class Local(iv.Intervention):
        def forward(self, base, source=None):
            return base

    assert (
        iv.registry.registered()[f"{__name__}.test_user_subclasses_register_themselves.<locals>.Local"]
        is Local
    )


# -- errors ----------------------------------------------------------------------------------------
def _saved(tmp_path) -> Path:
    return iv.save_interventions(
        tmp_path / "s",
        {"layers.0.output": iv.RotatedSubspace(SIZE, 2), "layers.1.output": iv.Add(torch.ones(SIZE))},
    )


def _edit_json(path: Path, fn):
    doc = json.loads((path / "interventions.json").read_text())
    fn(doc)
    (path / "interventions.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "damage, file, match",
    [
        (
            lambda p: (p / "interventions.json").write_text('{"format": "interventions.saved", "vers'),
            "interventions.json",
            "damaged JSON",
        ),
        (
            lambda p: (p / "tensors.safetensors").write_bytes((p / "tensors.safetensors").read_bytes()[:40]),
            "tensors.safetensors",
            "damaged safetensors",
        ),
        (lambda p: (p / "tensors.safetensors").unlink(), "tensors.safetensors", "missing or damaged"),
        (lambda p: (p / "interventions.json").unlink(), "", "no interventions.json"),
        (
            lambda p: _edit_json(p, lambda d: d["modules"]["0"].update({"class": "Unheard"})),
            "interventions.json",
            "unknown intervention class 'Unheard'.*Known classes: .*RotatedSubspace",
        ),
        (lambda p: _edit_json(p, lambda d: d.update({"version": 99})), "interventions.json", "version 99"),
        (
            lambda p: _edit_json(p, lambda d: d.update({"format": "other"})),
            "interventions.json",
            "not a saved",
        ),
        (
            lambda p: _edit_json(p, lambda d: d["entries"][0].update({"module": "42"})),
            "interventions.json",
            "module '42' is referenced",
        ),
        (lambda p: _edit_json(p, lambda d: d["modules"]["0"].pop("args")), "interventions.json", "malformed"),
        (
            lambda p: _edit_json(p, lambda d: d["modules"]["0"].update({"args": [SIZE, 0]})),
            "interventions.json",
            "could not rebuild module 0",
        ),
        (
            lambda p: save_file({"2/state/vector": torch.ones(3)}, str(p / "tensors.safetensors")),
            "tensors.safetensors",
            "missing from",
        ),
        (
            lambda p: save_file(
                {**load_file(str(p / "tensors.safetensors")), "2/state/vector": torch.ones(3)},
                str(p / "tensors.safetensors"),
            ),
            "interventions.json",
            "do not fit",
        ),
    ],
)
def test_a_damaged_or_unknown_file_names_the_path_and_the_problem(tmp_path, damage, file, match):
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(InterventionError, match=match) as err:
        iv.load_interventions(path)
    assert str(path / file).rstrip("/") in str(err.value)


def test_unsaveable_things_fail_before_anything_is_written(tmp_path):
    with pytest.raises(InterventionError, match="Linear is not a saveable module"):
        iv.save_interventions(tmp_path / "a", {"layers.0.output": torch.nn.Linear(2, 2)})

    class Odd(iv.Intervention):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

    with pytest.raises(InterventionError, match="argument 0 of .*Odd.*a function"):
        iv.save_interventions(tmp_path / "b", {"layers.0.output": Odd(lambda x: x)})
    with pytest.raises(InterventionError, match="non-empty mapping"):
        iv.save_interventions(tmp_path / "c", {})
    assert not any((tmp_path / n).exists() for n in "abc")


# -- Alignment <-> JSON ---------------------------------------------------------------------------
atoms = st.recursive(
    st.text(max_size=6) | st.integers(-(10**12), 10**12),
    lambda inner: st.tuples(inner, inner) | st.tuples(inner),
    max_leaves=4,
)
ints = st.lists(st.integers(0, 40), min_size=1, max_size=3)
sites = st.builds(
    Site,
    st.sampled_from(["layers.0.output", "layers.1.attention_heads", "module:transformer.h.0"]),
    positions=st.none() | ints | ints.map(lambda xs: torch.tensor([xs, xs[::-1]])),
    heads=st.none() | ints,
    dims=st.none() | ints | st.tuples(st.integers(0, 8), st.integers(9, 20)).map(lambda t: slice(*t)),
)
alignments = st.dictionaries(atoms, st.lists(sites | atoms, min_size=1, max_size=3), max_size=4).map(
    iv.Alignment
)


@settings(max_examples=60, deadline=None)
@given(alignments)
def test_alignment_json_round_trip(alignment):
    text = alignment.to_json()
    again = iv.Alignment.from_json(text)
    assert again == alignment
    assert again.to_json() == text  # deterministic: equal alignments give equal text
    for key in alignment:  # Sites stay Sites (with their selectors), strings stay strings
        assert sorted(map(repr, again[key])) == sorted(map(repr, alignment[key]))


def test_alignment_json_errors():
    with pytest.raises(AlignmentError, match="float"):
        iv.Alignment({1.5: "layers.0.output"}).to_json()
    with pytest.raises(AlignmentError, match="not valid JSON"):
        iv.Alignment.from_json("{")
    with pytest.raises(AlignmentError, match="format"):
        iv.Alignment.from_json('{"items": []}')
    with pytest.raises(AlignmentError, match="malformed"):
        iv.Alignment.from_json(
            '{"format": "interventions.Alignment", "version": 1, "items": [[{"x": 1}, ["a"]]]}'
        )
