"""Batched calls equal per-example calls; in-batch interchange equals separate runs; hooks never leak.

Per-example results are the engine run on one example at a time (a loop); multi-source results
are checked against the oracle applying each group's edit in order.
"""

from __future__ import annotations

import oracles
import pytest
import torch
from conftest import hook_ids, tokens

from interventions import (
    InterventionError,
    SelectorError,
    ShapeError,
    Site,
    Zero,
    get_value,
    interchange,
    set_value,
)
from interventions.hooks import StopForward

TOL = {"rtol": 1e-5, "atol": 1e-6}
BATCH = 3
BASE = tokens(BATCH, 6, seed=21)
SOURCE = tokens(BATCH, 6, seed=22)
SOURCE2 = tokens(BATCH, 6, seed=23)
PER_EXAMPLE = torch.tensor([[0, 5], [2, 2], [4, 1]])


def row(site: Site, b: int) -> Site:
    """`site` for example b alone (its row of per-example positions)."""
    pos = site.positions
    if isinstance(pos, torch.Tensor):
        pos = pos[b:b + 1]
    return Site(site.name, pos, site.heads, site.dims)


SITES = [
    Site("layers.0.input", positions=PER_EXAMPLE),
    Site("layers.0.attention_heads", positions=[1, 3], heads=[2, 0], dims=[1, 3]),
    Site("layers.1.attention_output", dims=slice(4, 9)),
    Site("layers.1.mlp_output", positions=PER_EXAMPLE, dims=[0, 15]),
    Site("layers.1.output", positions=[-1]),
    Site("logits", positions=PER_EXAMPLE),
]


def seeded(shape, seed):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_batched_get_equals_per_example(tiny):
    got = get_value(tiny, BASE, SITES)
    for site in SITES:
        loop = torch.cat([get_value(tiny, BASE[b:b + 1], row(site, b))[row(site, b)] for b in range(BATCH)])
        torch.testing.assert_close(got[site], loop, **TOL)


@pytest.mark.parametrize("site", SITES, ids=str)
def test_batched_set_equals_per_example(tiny, site):
    shape = get_value(tiny, BASE, site)[site].shape
    value = seeded(shape, 1)
    got = set_value(tiny, {site: value}, inputs=BASE).logits
    loop = torch.cat([set_value(tiny, {row(site, b): value[b:b + 1]}, inputs=BASE[b:b + 1]).logits
                      for b in range(BATCH)])
    torch.testing.assert_close(got, loop, **TOL)

    def fn(cur):
        return torch.sin(cur) * 2

    got = set_value(tiny, {site: fn}, inputs=BASE).logits
    loop = torch.cat([set_value(tiny, {row(site, b): fn}, inputs=BASE[b:b + 1]).logits for b in range(BATCH)])
    torch.testing.assert_close(got, loop, **TOL)


@pytest.mark.parametrize("site", SITES, ids=str)
def test_batched_interchange_equals_per_example(tiny, site):
    got = interchange(tiny, BASE, SOURCE, site).logits
    loop = torch.cat([interchange(tiny, BASE[b:b + 1], SOURCE[b:b + 1], row(site, b)).logits
                      for b in range(BATCH)])
    torch.testing.assert_close(got, loop, **TOL)
    assert not torch.allclose(got, tiny(BASE).logits)


def test_per_example_positions_with_right_padding_equal_unpadded_runs(tiny):
    """Per-example positions on a padded batch read and write what each unpadded example would."""
    lengths = [4, 6, 5]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    pos = torch.tensor([[0, 3], [5, 1], [2, 4]])
    site = Site("layers.1.attention_heads", positions=pos, heads=[1, 3])
    got = get_value(tiny, {"input_ids": BASE, "attention_mask": mask}, site)[site]
    src_pos = torch.tensor([[3, 3], [0, 5], [1, 1]])
    src_site = Site("layers.0.output", positions=src_pos)
    base_site = Site("layers.1.input", positions=pos)
    out = interchange(tiny, {"input_ids": BASE, "attention_mask": mask}, {"input_ids": SOURCE, "attention_mask": mask},
                      base_site, source_sites=src_site).logits
    for b, n in enumerate(lengths):
        one = BASE[b:b + 1, :n]
        torch.testing.assert_close(got[b:b + 1], get_value(tiny, one, row(site, b))[row(site, b)], **TOL)
        ref = interchange(tiny, one, SOURCE[b:b + 1, :n], row(base_site, b), source_sites=row(src_site, b)).logits
        torch.testing.assert_close(out[b:b + 1, :n], ref, **TOL)
    with pytest.raises(SelectorError, match="padding"):
        get_value(tiny, {"input_ids": BASE, "attention_mask": mask}, Site("layers.0.output", positions=[5]))


# -- in-batch interchange -------------------------------------------------------------------------
def mix(base, src):
    return 0.5 * base + src


IN_BATCH_CASES = {
    "same-site": {"sources": SOURCE, "sites": Site("layers.1.output", positions=[1, 2])},
    "per-example": {"sources": SOURCE, "sites": Site("layers.0.attention_heads", positions=PER_EXAMPLE, heads=[3])},
    "earlier-source-site": {"sources": SOURCE, "sites": Site("layers.1.input", positions=[4]),
                                "source_sites": Site("layers.0.input", positions=[0])},
    "intervention": {"sources": SOURCE, "sites": [Site("layers.0.mlp_output", dims=[2, 3])], "intervention": mix},
    "two-sources": {"sources": [SOURCE, SOURCE2],
                        "sites": [[Site("layers.0.output", positions=[1, 2])],
                               [Site("layers.0.output", positions=[2, 3]), Site("layers.1.attention_output")]],
                        "intervention": [None, mix]},
}


@pytest.mark.parametrize("case", sorted(IN_BATCH_CASES))
def test_in_batch_equals_separate_runs(tiny, case):
    kwargs = IN_BATCH_CASES[case]
    separate = interchange(tiny, BASE, **kwargs).logits
    together = interchange(tiny, BASE, **kwargs, in_batch=True).logits
    assert together.shape == separate.shape == (BATCH, 6, 40)
    torch.testing.assert_close(together, separate, **TOL)
    mask = torch.ones_like(BASE)
    mapped = {k: ([{"input_ids": s, "attention_mask": mask} for s in v] if isinstance(v, list)
                  else {"input_ids": v, "attention_mask": mask}) if k == "sources" else v for k, v in kwargs.items()}
    together = interchange(tiny, {"input_ids": BASE, "attention_mask": mask}, **mapped, in_batch=True).logits
    torch.testing.assert_close(together, separate, **TOL)


def test_in_batch_rejects_a_source_site_after_the_base_site(tiny):
    before = hook_ids(tiny)
    with pytest.raises(InterventionError, match="no later"):
        interchange(tiny, BASE, SOURCE, "layers.0.output", source_sites="layers.1.output", in_batch=True)
    assert hook_ids(tiny) == before


# -- several sources, against the oracle -----------------------------------------------------------
MULTI_SOURCE_CASES = {
    # overlapping writes (a later group overwrites), per-example positions, heads, dims, a mixing callable
    "overlapping": {
        "sources": [SOURCE, SOURCE2, SOURCE],
        "sites": [
            [Site("layers.0.output", positions=[1, 2])],
            [Site("layers.0.output", positions=[2, 3]),
             Site("layers.1.attention_heads", positions=PER_EXAMPLE, heads=[1])],
            [Site("layers.1.mlp_output", dims=[0, 1, 2])],
        ],
        "source_sites": [
            [Site("layers.0.output", positions=[4, 0])],
            [Site("layers.0.output", positions=[2, 3]),
             Site("layers.1.attention_heads", positions=PER_EXAMPLE, heads=[2])],
            [Site("layers.1.mlp_output", dims=[3, 4, 5])],
        ],
        "intervention": [None, None, mix],
    },
    # the same source site read from two different sources
    "same-source-site": {
        "sources": [SOURCE, SOURCE2],
        "sites": [[Site("layers.1.input", positions=[1])], [Site("layers.1.input", positions=[3])]],
        "source_sites": [[Site("layers.0.input", positions=[2])], [Site("layers.0.input", positions=[2])]],
        "intervention": None,
    },
}


@pytest.mark.parametrize("case", sorted(MULTI_SOURCE_CASES))
def test_multiple_sources_apply_in_order(tiny, case):
    """Group k writes source k's values; a later group overwrites an earlier one where they overlap."""
    kw = MULTI_SOURCE_CASES[case]
    got = interchange(tiny, BASE, kw["sources"], kw["sites"], source_sites=kw["source_sites"],
                      intervention=kw["intervention"]).logits
    mixes = kw["intervention"] or [None] * len(kw["sources"])
    runs = [oracles.forward(tiny, s) for s in kw["sources"]]
    edits: dict[str, list] = {}
    for g, (bases, srcs) in enumerate(zip(kw["sites"], kw["source_sites"])):
        for b, s in zip(bases, srcs):
            sel = {"positions": b.positions, "heads": b.heads, "dims": b.dims}
            src_sel = {"positions": s.positions, "heads": s.heads, "dims": s.dims}
            edits.setdefault(b.name, []).append(oracles.interchange_edit(runs[g][s.name], sel, src_sel, mix=mixes[g]))
    want = oracles.forward(tiny, BASE, edits)["logits"]
    torch.testing.assert_close(got, want, **TOL)
    if case == "overlapping":  # order matters where groups overlap: the reverse order is a different model
        edits["layers.0.output"].reverse()
        assert not torch.allclose(oracles.forward(tiny, BASE, edits)["logits"], want)


# -- no hook survives ----------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


def explode(*_):
    raise Boom("raised inside an intervention")


def test_no_hook_survives(tiny):
    clean = tiny(BASE).logits
    before = hook_ids(tiny)
    site = Site("layers.1.attention_heads", positions=[2], heads=[1])

    # normal exits (get_value stops early with StopForward, which must not escape)
    get_value(tiny, BASE, ["layers.0.input", site])
    set_value(tiny, {site: Zero()}, inputs=BASE)
    interchange(tiny, BASE, SOURCE, site)
    interchange(tiny, BASE, SOURCE, site, in_batch=True)
    with set_value(tiny, {site: Zero()}):
        assert hook_ids(tiny) != before  # installed inside the block
        tiny(BASE)
    assert hook_ids(tiny) == before

    # an exception raised by an intervention callable propagates, and the hooks go
    with pytest.raises(Boom):
        set_value(tiny, {site: explode}, inputs=BASE)
    with pytest.raises(Boom):
        interchange(tiny, BASE, SOURCE, site, intervention=explode)
    with pytest.raises(Boom):
        interchange(tiny, BASE, SOURCE, site, intervention=explode, in_batch=True)
    with pytest.raises(Boom), set_value(tiny, {site: Zero()}):
        explode()
    assert hook_ids(tiny) == before

    # a StopForward raised by a user's callable inside set_value is not swallowed silently
    def stop(_):
        raise StopForward

    with pytest.raises(StopForward):
        set_value(tiny, {site: stop}, inputs=BASE)
    assert hook_ids(tiny) == before

    # bad shapes: caught before the forward (tensor with inputs) or inside it (context manager, callable)
    wrong = torch.zeros(BATCH, 1, 1, 3, dtype=torch.float64)
    with pytest.raises(ShapeError):
        set_value(tiny, {site: wrong}, inputs=BASE)
    with pytest.raises(ShapeError), set_value(tiny, {site: wrong}):
        tiny(BASE)
    with pytest.raises(ShapeError):
        set_value(tiny, {site: lambda cur: cur[..., :2]}, inputs=BASE)
    with pytest.raises(ShapeError):
        interchange(tiny, BASE, SOURCE, site, intervention=lambda b, s: s[:, :, :, :1])
    with pytest.raises(InterventionError):
        get_value(tiny, BASE, ["layers.0.output", "layers.7.output"])
    assert hook_ids(tiny) == before
    torch.testing.assert_close(tiny(BASE).logits, clean, **TOL)  # and the model is unchanged
