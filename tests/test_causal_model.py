"""CausalModel: run, interventions, interchange, counterfactual sampling, and its errors.

Oracles are hand-computed values of tiny models written out here (never the code under test).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interventions import CausalModel, CausalModelError, CounterfactualDataset, InterventionError


# -- models written out by hand -----------------------------------------------------------------
def arithmetic() -> CausalModel:
    """X, Y, Z -> S = X + Y, T = Y * Z -> O = S - T."""
    return CausalModel(
        variables=["X", "Y", "Z", "S", "T", "O"],
        parents={"S": ["X", "Y"], "T": ["Y", "Z"], "O": ["S", "T"]},
        mechanisms={"S": lambda x, y: x + y, "T": lambda y, z: y * z, "O": lambda s, t: s - t},
    )


def hier_equality(sampler=None) -> CausalModel:
    """W, X, Y, Z -> WX = (W == X), YZ = (Y == Z) -> O = (WX == YZ)."""
    eq = lambda u, v: (u == v).all(-1)
    return CausalModel(
        variables=["W", "X", "Y", "Z", "WX", "YZ", "O"],
        parents={"WX": ["W", "X"], "YZ": ["Y", "Z"], "O": ["WX", "YZ"]},
        mechanisms={"WX": eq, "YZ": eq, "O": lambda a, b: a == b},
        sampler=sampler,
    )


def t(*v):
    return torch.tensor(v)


# -- run -----------------------------------------------------------------------------------------
def test_arithmetic_run_gives_every_value():
    out = arithmetic().run({"X": t(1, 4), "Y": t(2, 0), "Z": t(3, 7)})
    assert out["S"].tolist() == [3, 4]
    assert out["T"].tolist() == [6, 0]
    assert out["O"].tolist() == [-3, 4]
    assert set(out) == {"X", "Y", "Z", "S", "T", "O"}


def test_arithmetic_interventions_override_mechanisms():
    out = arithmetic().run({"X": t(1), "Y": t(2), "Z": t(3)}, interventions={"S": t(10)})
    assert out["S"].tolist() == [10] and out["O"].tolist() == [10 - 6]
    out = arithmetic().run({"X": t(1), "Z": t(3)}, interventions={"Y": t(5)})  # an input set by intervention
    assert out["O"].tolist() == [(1 + 5) - 5 * 3]


def test_model_properties():
    cm = arithmetic()
    assert cm.inputs == ("X", "Y", "Z") and cm.output == "O"
    assert cm.order.index("S") < cm.order.index("O") and cm.order.index("T") < cm.order.index("O")
    assert set(cm.graph.edges) == {("X", "S"), ("Y", "S"), ("Y", "T"), ("Z", "T"), ("S", "O"), ("T", "O")}


@settings(max_examples=40, deadline=None)
@given(base=st.tuples(*[st.integers(-9, 9)] * 3), s1=st.tuples(*[st.integers(-9, 9)] * 3),
       s2=st.tuples(*[st.integers(-9, 9)] * 3))
def test_arithmetic_interchange_matches_hand_formula(base, s1, s2):
    cm = arithmetic()
    mk = lambda v: {"X": t(v[0]), "Y": t(v[1]), "Z": t(v[2])}
    # S from s1 and T from s2: O = (x1 + y1) - (y2 * z2).
    out = cm.interchange(mk(base), [mk(s1), mk(s2)], ["S", "T"])
    assert out["O"].item() == (s1[0] + s1[1]) - (s2[1] * s2[2])
    # S alone from s1: O = (x1 + y1) - y_b * z_b.
    out = cm.interchange(mk(base), mk(s1), "S")
    assert out["O"].item() == (s1[0] + s1[1]) - base[1] * base[2]
    # both from the same source: O = (x1 + y1) - y1 * z1.
    out = cm.interchange(mk(base), mk(s1), ["S", "T"])
    assert out["O"].item() == (s1[0] + s1[1]) - s1[1] * s1[2]


def test_hierarchical_equality_run_and_interchange():
    a, b, c = t(0.1, 0.2, 0.3, 0.4), t(-0.5, 0.5, 0.0, 0.9), t(0.7, -0.7, 0.2, -0.2)
    stack = lambda *v: torch.stack(v)
    # row 0: a==a, c!=b -> WX=T, YZ=F, O=F; row 1: a!=b, c==c -> F, T, F; row 2: a==a, c==c -> O=T
    base = {"W": stack(a, a, a), "X": stack(a, b, a), "Y": stack(c, b, c), "Z": stack(b, b, c)}
    cm = hier_equality()
    out = cm.run(base)
    assert out["WX"].tolist() == [True, False, True]
    assert out["YZ"].tolist() == [False, True, True]
    assert out["O"].tolist() == [False, False, True]
    # a source where W != X everywhere: setting WX=False flips O where YZ is False (row 0), and row 2.
    source = {"W": stack(a, a, a), "X": stack(b, b, b), "Y": stack(c, c, c), "Z": stack(c, c, c)}
    out = cm.interchange(base, source, "WX")
    assert out["WX"].tolist() == [False, False, False]
    assert out["O"].tolist() == [True, False, False]
    # WX from that source, YZ from the base itself as a second source: same as above.
    assert cm.interchange(base, [source, base], ["WX", "YZ"])["O"].tolist() == [True, False, False]
    # YZ from the source (YZ=True everywhere): O = WX.
    assert cm.interchange(base, source, "YZ")["O"].tolist() == [True, False, True]


# -- counterfactual datasets ----------------------------------------------------------------------
def _pool_sampler(pool):
    def sample(n, g):
        idx = torch.randint(len(pool), (n, 4), generator=g)
        return {k: pool[idx[:, i]] for i, k in enumerate("WXYZ")}
    return sample


def test_sample_counterfactuals_labels_match_hand_computation():
    pool = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))  # 3 entities: many equalities
    cm = hier_equality(_pool_sampler(pool))
    data = cm.sample_counterfactuals(200, ["WX", "YZ"], torch.Generator().manual_seed(0))
    assert isinstance(data, CounterfactualDataset) and len(data) == 200
    assert data.variables == (("WX",), ("YZ",)) and data.intervened == ("WX", "YZ")
    for i in range(200):
        b, s1, s2 = data.base, data.sources[0], data.sources[1]
        wx = bool(torch.equal(s1["W"][i], s1["X"][i]))
        yz = bool(torch.equal(s2["Y"][i], s2["Z"][i]))
        assert int(data.labels[i]) == int(wx == yz)
        base_label = torch.equal(b["W"][i], b["X"][i]) == torch.equal(b["Y"][i], b["Z"][i])
        assert int(data.base_labels[i]) == int(base_label)
        # the default encoding concatenates W, X, Y, Z
        assert torch.equal(data.base_inputs[i], torch.cat([b[k][i] for k in "WXYZ"]))
        assert torch.equal(data.source_inputs[1][i], torch.cat([s2[k][i] for k in "WXYZ"]))
    assert data.labels.dtype == torch.long
    assert 0 < int(data.labels.sum()) < 200


def test_one_source_group_takes_all_its_variables_from_one_source():
    pool = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    data = hier_equality(_pool_sampler(pool)).sample_counterfactuals(100, [["WX", "YZ"]])
    s = data.sources[0]
    assert len(data.sources) == 1
    for i in range(100):
        want = torch.equal(s["W"][i], s["X"][i]) == torch.equal(s["Y"][i], s["Z"][i])
        assert int(data.labels[i]) == int(want)


def test_dataset_slicing_batches_and_concat():
    cm = arithmetic()
    sampler = lambda n, g: {k: torch.randint(0, 5, (n,), generator=g) for k in "XYZ"}
    data = cm.sample_counterfactuals(10, "S", torch.Generator().manual_seed(0), sampler=sampler)
    assert torch.equal(data[3].labels, data.labels[3:4])
    assert torch.equal(data[2:5].sources[0]["X"], data.sources[0]["X"][2:5])
    got = torch.cat([b.labels for b in data.batches(3)])
    assert torch.equal(got, data.labels)
    shuffled = torch.cat([b.labels for b in data.batches(4, torch.Generator().manual_seed(1))])
    assert sorted(shuffled.tolist()) == sorted(data.labels.tolist())
    both = CounterfactualDataset.concat([data, data[:4]])
    assert len(both) == 14 and torch.equal(both.base_inputs[10:], data.base_inputs[:4])
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.labels = data.labels  # type: ignore[misc]
    # labels are S-interchanged: O = (xs + ys) - yb * zb
    want = (data.sources[0]["X"] + data.sources[0]["Y"]) - data.base["Y"] * data.base["Z"]
    assert torch.equal(data.labels, want)


def test_sampler_is_required_and_must_cover_inputs():
    with pytest.raises(CausalModelError, match="sampler"):
        arithmetic().sample_inputs(4)
    with pytest.raises(CausalModelError, match=r"\['Z'\]"):
        arithmetic().sample_inputs(4, sampler=lambda n, g: {"X": torch.zeros(n), "Y": torch.zeros(n)})
    with pytest.raises(CausalModelError, match="output"):
        arithmetic().sample_counterfactuals(4, "O", sampler=lambda n, g: {k: torch.zeros(n) for k in "XYZ"})


# -- errors --------------------------------------------------------------------------------------
def test_cycle_is_rejected():
    with pytest.raises(CausalModelError, match="cycle"):
        CausalModel(["X", "A", "B"], {"A": ["X", "B"], "B": ["A"]}, {"A": lambda x, b: x, "B": lambda a: a})


def test_missing_mechanism_is_rejected():
    with pytest.raises(CausalModelError, match=r"\['T'\].*no mechanism"):
        CausalModel(["X", "S", "T"], {"S": ["X"], "T": ["S"]}, {"S": lambda x: x})


def test_unknown_variables_are_rejected():
    with pytest.raises(CausalModelError, match="unknown parents"):
        CausalModel(["X", "S"], {"S": ["X", "Q"]}, {"S": lambda x, q: x})
    with pytest.raises(CausalModelError, match="unknown variables"):
        CausalModel(["X", "S"], {"S": ["X"]}, {"S": lambda x: x, "Q": lambda: 0})
    cm = arithmetic()
    base = {"X": t(1), "Y": t(2), "Z": t(3)}
    with pytest.raises(CausalModelError, match="Q"):
        cm.run({**base, "Q": t(1)})
    with pytest.raises(CausalModelError, match="Q"):
        cm.run(base, interventions={"Q": t(1)})
    with pytest.raises(CausalModelError, match="Q"):
        cm.interchange(base, base, "Q")
    with pytest.raises(CausalModelError, match="Q"):
        cm.sample_counterfactuals(2, "Q", sampler=lambda n, g: {k: torch.zeros(n) for k in "XYZ"})


def test_other_malformed_models_and_queries():
    with pytest.raises(CausalModelError, match="input variables"):
        CausalModel(["X", "S"], {"S": ["X"]}, {"S": lambda x: x, "X": lambda: 1})
    with pytest.raises(CausalModelError, match="sinks"):
        CausalModel(["X", "A", "B"], {"A": ["X"], "B": ["X"]}, {"A": lambda x: x, "B": lambda x: x})
    with pytest.raises(CausalModelError, match="missing values"):
        arithmetic().run({"X": t(1), "Y": t(2)})
    with pytest.raises(CausalModelError, match="not input variables"):
        arithmetic().run({"X": t(1), "Y": t(2), "Z": t(3), "S": t(0)})
    with pytest.raises(CausalModelError, match="one per variable"):
        base = {"X": t(1), "Y": t(2), "Z": t(3)}
        arithmetic().interchange(base, [base], ["S", "T"])
    assert issubclass(CausalModelError, InterventionError)
