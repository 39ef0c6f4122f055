"""get_value / set_value / interchange at every canonical site of GPT-2 and Llama, against the oracle.

The oracle (tests/oracles.py) is a hand-written forward from the weights with its own loop-based
selectors; each engine result must equal the oracle run with the same edit (rtol 1e-5, atol 1e-6,
float64 models). Intervention types are checked against their closed-form math the same way.
"""

from __future__ import annotations

import oracles
import pytest
import torch
from conftest import build, tokens

from interventions import (
    Add,
    Constant,
    LowRankRotatedSubspace,
    Replace,
    RotatedSubspace,
    Site,
    SiteGraph,
    Zero,
    get_value,
    interchange,
    set_value,
)

TOL = {"rtol": 1e-5, "atol": 1e-6}
FAMILIES = ("gpt2", "llama")
KINDS = ("input", "attention_heads", "attention_output", "mlp_output", "output")
SITES = [f"layers.{i}.{k}" for i in range(2) for k in KINDS] + ["logits"]

BASE = tokens(2, 6, seed=1)
SOURCE = tokens(2, 6, seed=2)
SHORT_SOURCE = tokens(2, 5, seed=3)  # a source of another length (for source_sites)
PER_EXAMPLE = torch.tensor([[0, 5], [3, 2]])


@pytest.fixture(scope="module")
def models():
    return {f: build(f) for f in FAMILIES}


def selectors(site: str) -> list[dict]:
    """Selector combinations that fit `site` (head sites have a last axis of head_dim = 4)."""
    heads = site.endswith("attention_heads")
    dims = [slice(1, 3), [3, 0]] if heads else [slice(2, 7), [0, 5, 3]]
    out = [
        {},
        {"positions": [1, 4]},
        {"positions": [1, -1]},
        {"dims": dims[0]},
        {"dims": dims[1]},
        {"positions": [0, 3], "dims": dims[1]},
        {"positions": PER_EXAMPLE},
        {"positions": PER_EXAMPLE, "dims": dims[0]},
    ]
    if heads:
        out += [
            {"heads": [1, 3]},
            {"heads": [2]},
            {"heads": [3, 0], "positions": [4], "dims": slice(0, 2)},
            {"heads": [3, 0], "positions": PER_EXAMPLE},
        ]
    return out


def ids(sel: dict) -> str:
    return ",".join(f"{k}={'tensor' if isinstance(v, torch.Tensor) else v}" for k, v in sel.items()) or "whole"


def random_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(seed))


# -- the oracle itself ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_logits_and_hidden_states_equal_the_model(models, family):
    model = models[family]
    clean = oracles.forward(model, BASE)
    ref = model(BASE, output_hidden_states=True)
    torch.testing.assert_close(clean["logits"], ref.logits, **TOL)
    torch.testing.assert_close(clean["layers.0.input"], ref.hidden_states[0], **TOL)
    torch.testing.assert_close(clean["layers.0.output"], ref.hidden_states[1], **TOL)
    # with right padding, the real tokens' logits are unchanged by the pad tokens
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    masked = oracles.forward(model, BASE, attention_mask=mask)
    ref = model(input_ids=BASE, attention_mask=mask).logits
    torch.testing.assert_close(masked["logits"][mask.bool()], ref[mask.bool()], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_in_float32(family):
    """Also fp32: the same math, looser bounds (float32 rounding in a different op order)."""
    model = build(family, torch.float32)
    torch.testing.assert_close(oracles.forward(model, BASE)["logits"], model(BASE).logits, rtol=1e-4, atol=1e-5)
    got = get_value(model, BASE, Site("layers.1.attention_heads", positions=[2], heads=[1]))
    want = oracles.select(oracles.forward(model, BASE)["layers.1.attention_heads"], [2], [1])
    torch.testing.assert_close(next(iter(got.values())), want, rtol=1e-4, atol=1e-5)


def test_sites_are_the_oracle_sites(models):
    for model in models.values():
        assert [s for s in SiteGraph.from_model(model).sites if s in SITES] == SITES
        assert set(SITES) <= set(oracles.forward(model, BASE))


# -- get_value ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_get_value(models, family, site):
    model = models[family]
    clean = oracles.forward(model, BASE)
    for sel in selectors(site):
        got = get_value(model, BASE, Site(site, **sel))
        assert len(got) == 1
        torch.testing.assert_close(next(iter(got.values())), oracles.select(clean[site], **sel), **TOL,
                                   msg=lambda m, sel=sel: f"{site} {ids(sel)}: {m}")
    assert torch.equal(get_value(model, BASE, site)[site], get_value(model, {"input_ids": BASE}, site)[site])


@pytest.mark.parametrize("family", FAMILIES)
def test_get_value_all_sites_at_once(models, family):
    model = models[family]
    clean = oracles.forward(model, BASE)
    asked = [Site(s, positions=[2, 5]) for s in SITES] + SITES  # whole sites index by name too
    got = get_value(model, BASE, asked)
    assert len(got) == 2 * len(SITES)
    for s in SITES:
        torch.testing.assert_close(got[s], clean[s], **TOL)
        torch.testing.assert_close(got[Site(s, positions=[2, 5])], oracles.select(clean[s], [2, 5]), **TOL)


def test_logits_site_with_labels_is_the_logits(models):
    """With labels, the model output starts with 'loss'; the logits site still reads the logits."""
    model = models["gpt2"]
    got = get_value(model, {"input_ids": BASE, "labels": BASE}, "logits")["logits"]
    torch.testing.assert_close(got, oracles.forward(model, BASE)["logits"], **TOL)


# -- set_value ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_set_value(models, family, site):
    model = models[family]
    clean = oracles.forward(model, BASE)
    for n, sel in enumerate(selectors(site)):
        shape_of = oracles.select(clean[site], **sel)
        value = random_like(shape_of, n)
        got = set_value(model, {Site(site, **sel): value}, inputs=BASE).logits
        want = oracles.forward(model, BASE, {site: oracles.set_to(value, **sel)})["logits"]
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, sel=sel: f"tensor {site} {ids(sel)}: {m}")

        def fn(cur):
            return torch.tanh(cur) + 0.5 * cur  # not affine: LayerNorm would undo an affine map

        got = set_value(model, {Site(site, **sel): fn}, inputs=BASE).logits
        want = oracles.forward(model, BASE, {site: oracles.edit_at(fn, **sel)})["logits"]
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, sel=sel: f"callable {site} {ids(sel)}: {m}")
        assert not torch.allclose(want, clean["logits"])  # the edit changed something


@pytest.mark.parametrize("family", FAMILIES)
def test_set_value_context_manager_broadcast_and_several_sites(models, family):
    model = models[family]
    a = Site("layers.0.attention_heads", positions=[1, 3], heads=[2])
    b = Site("layers.1.mlp_output", positions=[5], dims=[0, 7])
    va = random_like(torch.empty(1, 2, 1, 4, dtype=torch.float64), 10)  # batch 1 broadcasts
    vb = random_like(torch.empty(2, 1, 2, dtype=torch.float64), 11)
    with set_value(model, {a: va, b: vb}):
        got = model(BASE).logits
    want = oracles.forward(model, BASE, {
        a.name: oracles.set_to(va, [1, 3], [2]),
        b.name: oracles.set_to(vb, [5], dims=[0, 7]),
    })["logits"]
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(model(BASE).logits, oracles.forward(model, BASE)["logits"], **TOL)  # undone
    # two entries on one site apply in order: the second overwrites the first where they overlap
    first, second = Site("layers.0.output", positions=[1, 2]), Site("layers.0.output", positions=[2], dims=[4, 9])
    v1 = random_like(torch.empty(2, 2, 16, dtype=torch.float64), 12)
    v2 = random_like(torch.empty(1, 1, 2, dtype=torch.float64), 13)
    got = set_value(model, {first: v1, second: v2}, inputs=BASE).logits
    want = oracles.forward(model, BASE, {"layers.0.output": [
        oracles.set_to(v1, [1, 2]), oracles.set_to(v2, [2], dims=[4, 9])]})["logits"]
    torch.testing.assert_close(got, want, **TOL)


# -- interchange ----------------------------------------------------------------------------------
def source_pairs(site: str) -> list[tuple[dict, dict]]:
    """(base selectors, source selectors) pairs with different positions (and heads / dims) per side."""
    heads = site.endswith("attention_heads")
    pairs = [
        ({"positions": [1, 4]}, {"positions": [3, 0]}),
        ({"positions": PER_EXAMPLE}, {"positions": torch.tensor([[4, 4], [1, 0]])}),
        ({"positions": [5], "dims": [0, 1]}, {"positions": [-1], "dims": [2, 3]}),
    ]
    if heads:
        pairs += [({"positions": [2], "heads": [0, 3]}, {"positions": [1], "heads": [1, 2]})]
    return pairs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_interchange(models, family, site):
    model = models[family]
    source_run = oracles.forward(model, SOURCE)
    for sel in selectors(site):
        got = interchange(model, BASE, SOURCE, Site(site, **sel)).logits
        edit = oracles.interchange_edit(source_run[site], sel)
        want = oracles.forward(model, BASE, {site: edit})["logits"]
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, sel=sel: f"{site} {ids(sel)}: {m}")
    if site == "logits":
        torch.testing.assert_close(interchange(model, BASE, SOURCE, site).logits, source_run["logits"], **TOL)

    short_run = oracles.forward(model, SHORT_SOURCE)
    for base_sel, src_sel in source_pairs(site):
        got = interchange(model, BASE, SHORT_SOURCE, Site(site, **base_sel),
                          source_sites=Site(site, **src_sel)).logits
        edit = oracles.interchange_edit(short_run[site], base_sel, src_sel)
        want = oracles.forward(model, BASE, {site: edit})["logits"]
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, sel=base_sel: f"{site} {ids(sel)}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_interchange_across_sites_and_with_a_mixing_callable(models, family):
    """Read one site in the source, write another in the base; and intervention(base, source)."""
    model = models[family]
    source_run = oracles.forward(model, SOURCE)
    got = interchange(model, BASE, SOURCE, Site("layers.1.input", positions=[2]),
                      source_sites=Site("layers.0.input", positions=[4])).logits
    edit = oracles.interchange_edit(source_run["layers.0.input"], {"positions": [2]}, {"positions": [4]})
    torch.testing.assert_close(got, oracles.forward(model, BASE, {"layers.1.input": edit})["logits"], **TOL)
    again = interchange(model, BASE, SOURCE, Site("layers.1.input", positions=[2]),
                        source_sites=Site("layers.0.input", positions=[4]), intervention=Replace()).logits
    torch.testing.assert_close(again, got, **TOL)  # Replace is the default

    def mix(base, src):
        return 0.25 * base + 0.75 * src

    sites = [Site("layers.0.mlp_output", positions=[1, 2]), Site("layers.1.attention_heads", heads=[1])]
    got = interchange(model, BASE, SOURCE, sites, intervention=mix).logits
    want = oracles.forward(model, BASE, {
        "layers.0.mlp_output": oracles.interchange_edit(source_run["layers.0.mlp_output"],
                                                        {"positions": [1, 2]}, mix=mix),
        "layers.1.attention_heads": oracles.interchange_edit(source_run["layers.1.attention_heads"],
                                                             {"heads": [1]}, mix=mix),
    })["logits"]
    torch.testing.assert_close(got, want, **TOL)


# -- intervention types against their closed forms -------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_constant_mean_and_add(models, family):
    model = models[family]
    site = Site("layers.1.attention_output", positions=[2, 3])
    sel = {"positions": [2, 3]}

    got = set_value(model, {site: Zero()}, inputs=BASE).logits
    zeros = torch.zeros(2, 2, 16, dtype=torch.float64)
    torch.testing.assert_close(got, oracles.forward(model, BASE, {site.name: oracles.set_to(zeros, **sel)})["logits"],
                               **TOL)

    pool = tokens(4, 6, seed=7)
    acts = oracles.select(oracles.forward(model, pool)[site.name], **sel)  # [4, 2, 16]
    mean = sum(acts[i] for i in range(4))[None] / 4
    got = set_value(model, {site: Constant.mean_of(acts)}, inputs=BASE).logits
    torch.testing.assert_close(got, oracles.forward(model, BASE, {site.name: oracles.set_to(mean, **sel)})["logits"],
                               **TOL)

    vector = random_like(torch.empty(16, dtype=torch.float64), 3)
    got = set_value(model, {site: Add(vector, scale=0.5)}, inputs=BASE).logits
    edit = oracles.edit_at(lambda cur: cur + 0.5 * vector, **sel)
    torch.testing.assert_close(got, oracles.forward(model, BASE, {site.name: edit})["logits"], **TOL)


def rotate_swap_back(rotation: torch.Tensor, base, src, coords: slice):
    """Closed form of DAS: rotate both, take `coords` of the rotated source, rotate back (R orthogonal)."""
    rb, rs = base @ rotation.T, src @ rotation.T
    keep = torch.ones(rotation.shape[0], dtype=torch.bool)
    keep[coords] = False
    mixed = torch.where(keep, rb, rs)
    return mixed @ rotation


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", [
    ("layers.0.output", {"positions": [2, 5]}, 16),
    ("layers.1.attention_heads", {"positions": [3], "heads": [1, 2]}, 4),
])
def test_rotated_subspaces(models, family, where):
    model = models[family]
    name, sel, size = where
    site = Site(name, **sel)
    source_run = oracles.forward(model, SOURCE)
    torch.manual_seed(0)
    das = RotatedSubspace(size, 2).double()
    R = das.rotation.weight.detach()
    torch.testing.assert_close(R @ R.T, torch.eye(size, dtype=torch.float64), **TOL)
    for interv, coords in ((das, slice(0, 2)), (das.with_subspace(slice(1, 4)), slice(1, 4))):
        assert interv.rotation is das.rotation
        got = interchange(model, BASE, SOURCE, site, intervention=interv).logits
        edit = oracles.interchange_edit(source_run[name], sel,
                                        mix=lambda b, s, c=coords: rotate_swap_back(R, b, s, c))
        torch.testing.assert_close(got, oracles.forward(model, BASE, {name: edit})["logits"], **TOL)

    low = LowRankRotatedSubspace(size, 3).double()
    W = low.rotation.weight.detach()  # [3, size], orthonormal rows
    assert W.shape == (3, size)
    torch.testing.assert_close(W @ W.T, torch.eye(3, dtype=torch.float64), **TOL)
    # complete W's rows to a full orthonormal basis; swapping its first 3 coordinates is the closed form
    q, _ = torch.linalg.qr(torch.cat([W, random_like(torch.empty(size - 3, size, dtype=torch.float64), 5)]).T)
    full = q.T
    got = interchange(model, BASE, SOURCE, site, intervention=low).logits
    edit = oracles.interchange_edit(source_run[name], sel, mix=lambda b, s: rotate_swap_back(full, b, s, slice(0, 3)))
    torch.testing.assert_close(got, oracles.forward(model, BASE, {name: edit})["logits"], **TOL)
