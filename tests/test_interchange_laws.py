"""Laws of interchange interventions on tiny real models (GPT-2, Llama), checked against plain forwards.

source == base is a no-op; no sites is a no-op; the whole last-layer residual stream carries the
source's output; grouping sites from one source does not matter; disjoint interventions commute.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import build, tokens
from interventions import Alignment, Site, SiteGraph, alignments, interchange, interchange_aligned

SEQ, BATCH = 6, 2
ATOL = 1e-5
FEW = settings(max_examples=8, deadline=None)


@functools.cache
def model(family: str):
    """The shared tiny randomised float64 model of `family` (tests/conftest.py), eval mode."""
    return build(family)


def inputs(seed: int) -> torch.Tensor:
    return tokens(BATCH, SEQ, seed)


def plain(m, x) -> torch.Tensor:
    with torch.no_grad():
        return m(x).logits


def logits(output) -> torch.Tensor:
    return output.logits.detach()


FAMILIES = ["gpt2", "llama"]
N_LAYERS = SiteGraph.from_model(model("gpt2")).num_layers
NAMES = [s for s in SiteGraph.from_model(model("gpt2")).sites if s != "logits"]
assert NAMES == [s for s in SiteGraph.from_model(model("llama")).sites if s != "logits"]


@st.composite
def sites(draw):
    """A site of either model: any canonical name, optionally narrowed to some positions / heads."""
    name = draw(st.sampled_from(NAMES))
    positions = draw(st.none() | st.lists(st.integers(0, SEQ - 1), min_size=1, max_size=3, unique=True))
    heads = None
    if name.endswith("attention_heads"):
        heads = draw(st.none() | st.lists(st.integers(0, 1), min_size=1, unique=True))
    return Site(name, positions=positions, heads=heads)


# -- no-ops -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@FEW
@given(chosen=st.lists(sites(), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_source_equal_to_base_is_the_plain_forward(family, chosen, seed):
    m, x = model(family), inputs(seed)
    expected = plain(m, x)
    assert torch.allclose(logits(interchange(m, x, x, chosen)), expected, atol=ATOL, rtol=0)
    assert torch.allclose(logits(interchange(m, x, x.clone(), chosen)), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_sites_is_the_plain_forward(family):
    m, base, source = model(family), inputs(1), inputs(2)
    expected = plain(m, base)
    assert not torch.allclose(expected, plain(m, source), atol=1e-3)  # the two inputs do differ
    teacher = alignments.full(N_LAYERS, N_LAYERS)
    for out in (interchange_aligned(m, base, source, Alignment()),
                interchange_aligned(m, base, source, teacher, keys=[]),
                interchange_aligned(m, {"input_ids": base}, {"input_ids": source}, Alignment())):
        assert torch.allclose(logits(out), expected, atol=ATOL, rtol=0)


# -- the last layer carries the source ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_residual_at_all_positions_gives_the_source_output(family):
    m, base, source = model(family), inputs(3), inputs(4)
    expected = plain(m, source)
    assert not torch.allclose(plain(m, base), expected, atol=1e-3)
    last = f"layers.{N_LAYERS - 1}.output"
    assert torch.allclose(logits(interchange(m, base, source, last)), expected, atol=ATOL, rtol=0)
    every = Site(last, positions=list(range(SEQ)))
    assert torch.allclose(logits(interchange(m, base, source, every)), expected, atol=ATOL, rtol=0)
    pi = Alignment({"top": last, "mid": "layers.0.output"})
    out = interchange_aligned(m, base, source, pi, keys=["top"])
    assert torch.allclose(logits(out), expected, atol=ATOL, rtol=0)
    # Only some positions: those rows follow the source, causal attention leaves the rest on the base.
    part = logits(interchange(m, base, source, Site(last, positions=[SEQ - 1])))
    assert torch.allclose(part[:, -1], expected[:, -1], atol=ATOL, rtol=0)
    assert torch.allclose(part[:, :-1], plain(m, base)[:, :-1], atol=ATOL, rtol=0)


# -- structure does not matter ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@FEW
@given(chosen=st.lists(sites(), min_size=2, max_size=5), cut=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_groups_from_one_source_equal_one_interchange_on_their_union(family, chosen, cut, seed):
    m, base, source = model(family), inputs(seed), inputs(seed + 1)
    cut = min(cut, len(chosen) - 1)
    first, second = chosen[:cut], chosen[cut:]
    union = logits(interchange(m, base, source, chosen))
    grouped = logits(interchange(m, base, [source, source], [first, second]))
    copied = logits(interchange(m, base, [source, source.clone()], [first, second]))  # two source runs
    assert torch.allclose(grouped, union, atol=ATOL, rtol=0)
    assert torch.allclose(copied, union, atol=ATOL, rtol=0)


@st.composite
def disjoint_groups(draw):
    """Sites that pairwise share no value, dealt into up to three groups (one source each)."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    chosen = []
    for name in names:
        split = draw(st.sampled_from(["whole", "one", "two"]))
        if split == "whole":
            chosen.append(Site(name))
        else:
            perm = draw(st.permutations(range(SEQ)))
            k = draw(st.integers(1, SEQ - 1))
            chosen.append(Site(name, positions=sorted(perm[:k])))
            if split == "two":
                chosen.append(Site(name, positions=sorted(perm[k:])))
    owner = [draw(st.integers(0, 2)) for _ in chosen]
    groups = [[s for s, o in zip(chosen, owner, strict=True) if o == g] for g in range(3)]
    return [g for g in groups if g]


@pytest.mark.parametrize("family", FAMILIES)
@FEW
@given(groups=disjoint_groups(), data=st.data(), seed=st.integers(0, 2**16))
def test_disjoint_interventions_do_not_depend_on_order(family, groups, data, seed):
    m, base = model(family), inputs(seed)
    srcs = [inputs(seed + 1 + g) for g in range(len(groups))]
    reference = logits(interchange(m, base, srcs, groups))
    order = data.draw(st.permutations(range(len(groups))))
    shuffled = [data.draw(st.permutations(groups[g])) for g in order]
    out = logits(interchange(m, base, [srcs[g] for g in order], shuffled))
    assert torch.allclose(out, reference, atol=ATOL, rtol=0)
    flat = [s for g in groups for s in g]  # one source for all: any order of one flat list
    one = logits(interchange(m, base, srcs[0], flat))
    assert torch.allclose(logits(interchange(m, base, srcs[0], data.draw(st.permutations(flat)))), one,
                          atol=ATOL, rtol=0)
