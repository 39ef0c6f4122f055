"""Alignment: its algebra's laws (hypothesis), every error, validate on real site graphs, and the
DIITO layer-stride constructors against the paper's / official code's tables written out by hand."""

from __future__ import annotations

import copy
import dataclasses
import functools
import pickle
import re
from pathlib import Path

import networkx as nx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from interventions import Alignment, AlignmentError, Site, SiteGraph, alignments
from interventions.alignment import UnknownKeyError

KEYS = [f"k{i}" for i in range(6)]
S1 = [f"s{i}" for i in range(6)]
S2 = [f"t{i}" for i in range(6)]
S3 = [f"u{i}" for i in range(6)]
UNIVERSE = KEYS + S1  # keys and sites drawn from one pool where the law must not confuse them


def L(i: int) -> str:
    return f"layers.{i}.output"


# -- strategies ---------------------------------------------------------------------------------
@st.composite
def partial_maps(draw, keys, sites, must_cover=()):
    """An alignment whose domain is a random subset of `keys` (always including `must_cover`)."""
    extra = draw(st.lists(st.sampled_from(keys), unique=True))
    domain = list(dict.fromkeys([*sorted(must_cover), *extra]))
    return Alignment({k: draw(st.frozensets(st.sampled_from(sites), min_size=1)) for k in domain})


@st.composite
def chains(draw):
    """(a, b, c) with a's image inside b's domain and b's image inside c's domain."""
    a = draw(partial_maps(KEYS, S1))
    b = draw(partial_maps(S1, S2, must_cover=a.image))
    c = draw(partial_maps(S2, S3, must_cover=b.image))
    return a, b, c


@st.composite
def injective(draw, keys=UNIVERSE, sites=UNIVERSE):
    """An alignment with singleton, pairwise distinct images (invertible)."""
    ks = draw(st.lists(st.sampled_from(keys), unique=True))
    ss = draw(st.permutations(sites))
    return Alignment(dict(zip(ks, ss[:len(ks)], strict=True)))


@st.composite
def three_disjoint(draw):
    """Three alignments with pairwise disjoint domains and images, and their union by hand."""
    owners = draw(st.lists(st.sampled_from([None, *KEYS]), min_size=len(S1), max_size=len(S1)))
    images: dict = {}
    for site, owner in zip(S1, owners, strict=True):
        if owner is not None:
            images.setdefault(owner, set()).add(site)
    part = {k: draw(st.integers(0, 2)) for k in images}
    parts = [Alignment({k: v for k, v in images.items() if part[k] == i}) for i in range(3)]
    return (*parts, images)


LAWS = settings(max_examples=50, deadline=None)  # each example is cheap; 50 per law keeps the file fast


# -- the laws -----------------------------------------------------------------------------------
@LAWS
@given(chains())
def test_composition_is_union_of_images(abc):
    a, b, _ = abc
    ba = b @ a
    assert ba.domain == a.domain
    for k in a:
        assert ba[k] == {t for s in a[k] for t in b[s]}


@LAWS
@given(chains())
def test_composition_is_associative(abc):
    a, b, c = abc
    assert c @ (b @ a) == (c @ b) @ a


@LAWS
@given(partial_maps(KEYS, S1))
def test_identity_is_a_left_and_right_unit(a):
    assert Alignment.identity(a.image) @ a == a
    assert Alignment.identity(S1) @ a == a  # an identity on a superset of the image too
    assert a @ Alignment.identity(a.domain) == a


@LAWS
@given(chains(), st.data())
def test_restrict_distributes_over_composition(abc, data):
    a, b, _ = abc
    keys = data.draw(st.lists(st.sampled_from(sorted(a.domain)), unique=True) if a.domain else st.just([]))
    assert (b @ a).restrict(keys) == b @ a.restrict(keys)
    assert a.restrict(keys).domain == frozenset(keys)
    assert all(a.restrict(keys)[k] == a[k] for k in keys)


@LAWS
@given(three_disjoint())
def test_union_is_commutative_and_associative(parts):
    a, b, c, images = parts
    assert a | b == b | a
    assert (a | b) | c == a | (b | c)
    assert (a | b) | c == Alignment(images)  # the hand-built union
    assert a | Alignment() == a


@LAWS
@given(injective())
def test_inverse_is_an_involution(a):
    assert a.inverse().inverse() == a
    assert a.inverse().domain == a.image and a.inverse().image == a.domain


@LAWS
@given(injective())
def test_inverse_composes_to_identity(a):
    assert a.inverse() @ a == Alignment.identity(a.domain)
    assert a @ a.inverse() == Alignment.identity(a.image)


@LAWS
@given(injective(KEYS, S1), injective(S1, S2))
def test_inverse_of_composition_reverses_order(a, b):
    b = b.restrict(a.image & b.domain)
    a = a.restrict([k for k in a if a[k] <= b.domain])
    assert (b @ a).inverse() == a.inverse() @ b.inverse()


@LAWS
@given(partial_maps(KEYS, S1), st.randoms())
def test_equality_and_hash_ignore_construction_order(a, rnd):
    items = list(a.items())
    rnd.shuffle(items)
    b = Alignment({k: list(v)[::-1] for k, v in items})
    assert a == b and hash(a) == hash(b)
    assert eval(repr(a), {"Alignment": Alignment}) == a  # the repr reads back


# -- construction and views ---------------------------------------------------------------------
def test_values_become_frozensets_and_views_work():
    a = Alignment({"WX": "layers.0.output", "YZ": ["layers.1.output", "layers.2.output"], 3: (4, 5)})
    assert a["WX"] == frozenset({"layers.0.output"}) and isinstance(a["WX"], frozenset)
    assert a["YZ"] == frozenset({"layers.1.output", "layers.2.output"})
    assert a[3] == frozenset({4, 5})  # a tuple is an iterable of atoms; an int is an atom
    assert a.domain == frozenset({"WX", "YZ", 3})
    assert a.image == frozenset({"layers.0.output", "layers.1.output", "layers.2.output", 4, 5})
    assert len(a) == 3 and list(a) == ["WX", "YZ", 3]
    assert "WX" in a and "nope" not in a and ["unhashable"] not in a
    assert a.sites(["WX", 3]) == frozenset({"layers.0.output", 4, 5})
    assert a.sites([]) == frozenset() and a.sites() == a.image
    assert a.get("nope") is None and dict(a)["WX"] == frozenset({"layers.0.output"})


def test_empty_alignment():
    e = Alignment()
    assert len(e) == 0 and e.domain == frozenset() and e.image == frozenset()
    assert e == Alignment({}) and hash(e) == hash(Alignment({}))
    assert repr(e) == "Alignment({})"
    assert e.inverse() == e and e @ e == e and e.validate() is e


def test_site_atoms_equal_their_names():
    a = Alignment({"x": Site("layers.0.output")})
    assert a == Alignment({"x": "layers.0.output"}) and hash(a) == hash(Alignment({"x": "layers.0.output"}))
    narrow = Site("layers.0.output", dims=slice(0, 4))
    b = Alignment({"x": narrow})
    assert b != a and b["x"] == frozenset({narrow})


def test_repr_is_readable_and_naturally_sorted():
    a = Alignment({"b": ["layers.10.output", "layers.9.output"], "a": "x"})
    assert repr(a) == "Alignment({'a': {'x'}, 'b': {'layers.9.output', 'layers.10.output'}})"


def test_alignment_is_immutable_and_picklable():
    a = Alignment({"x": ["s0", "s1"]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        a._map = {}
    with pytest.raises(TypeError):
        a["y"] = "s2"  # no item assignment
    with pytest.raises(TypeError):
        a._map["y"] = frozenset({"s2"})  # the inner mapping is read-only too
    assert a == Alignment({"x": ["s0", "s1"]})
    assert pickle.loads(pickle.dumps(a)) == a and copy.deepcopy(a) == a and Alignment(a) == a


def test_composition_by_hand():
    a = Alignment({"A": ["s0", "s1"], "B": "s2"})
    b = Alignment({"s0": "t0", "s1": ["t1", "t2"], "s2": "t3", "s9": "t9"})
    assert b @ a == Alignment({"A": {"t0", "t1", "t2"}, "B": {"t3"}})


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"x": []}, "empty set of sites"),
    ({"x": ["s0", ["nested"]]}, "not hashable"),
    ({"x": [{"s": 1}]}, "not hashable"),
    (5, "built from a mapping"),
    ("abc", "built from a mapping"),
])
def test_construction_errors(bad, match):
    with pytest.raises(AlignmentError, match=match):
        Alignment(bad)


def test_unknown_key_is_an_alignment_error_and_a_key_error():
    a = Alignment({"x": "s0"})
    with pytest.raises(UnknownKeyError, match="'y' is not in the alignment's domain"):
        a["y"]
    assert issubclass(UnknownKeyError, AlignmentError) and issubclass(UnknownKeyError, KeyError)
    with pytest.raises(AlignmentError, match=r"keys \{'q', 'z'\} are not in the alignment's domain"):
        a.restrict(["x", "z", "q"])
    with pytest.raises(AlignmentError, match="not in the alignment's domain"):
        a.sites(["nope"])


def test_composition_names_the_missing_sites():
    a = Alignment({"A": ["s0", "s1"], "B": "s2"})
    b = Alignment({"s0": "t0"})
    with pytest.raises(AlignmentError, match=r"sites \{'s1', 's2'\} of a's image are not in b's domain"):
        b @ a
    with pytest.raises(AlignmentError, match="combines two Alignments"):
        b @ 3


def test_union_errors():
    a = Alignment({"A": ["s0", "s1"]})
    with pytest.raises(AlignmentError, match=r"both define keys \{'A'\}"):
        a | Alignment({"A": "s5"})
    with pytest.raises(AlignmentError, match=r"both map to sites \{'s1'\}"):
        a | Alignment({"B": ["s1", "s2"]})
    with pytest.raises(AlignmentError, match="combines two Alignments"):
        a | 1
    assert a | {"B": "s2"} == Alignment({"A": ["s0", "s1"], "B": "s2"})  # a plain mapping is coerced


def test_inverse_errors():
    with pytest.raises(AlignmentError, match=r"keys map to several sites \('A' -> \{'s0', 's1'\}\)"):
        Alignment({"A": ["s0", "s1"], "B": "s2"}).inverse()
    with pytest.raises(AlignmentError, match=r"distinct keys map to the same site \('s0' <- \{'A', 'B'\}\)"):
        Alignment({"A": "s0", "B": "s0"}).inverse()


# -- validate -----------------------------------------------------------------------------------
@functools.cache
def gpt2(n_layer: int):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=8, n_head=2, vocab_size=32, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@functools.cache
def llama(n_layer: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=n_layer, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def student():
    return SiteGraph.from_model(gpt2(2))


@pytest.fixture(scope="module")
def teacher():
    return SiteGraph.from_model(llama(4))


def test_validate_accepts_a_good_alignment_and_chains(student, teacher):
    a = Alignment({L(0): [L(0), L(1)], L(1): [L(2), "module:model.layers.3.mlp"]})
    assert a.validate(student, teacher) is a
    assert a.validate() is a and a.validate(low_graph=teacher) is a and a.validate(high_graph=student) is a


def test_validate_rejects_unknown_low_sites(teacher):
    a = Alignment({"A": [L(0), L(9), "layers.1.banana"]})
    with pytest.raises(AlignmentError, match=r"sites \{'layers.1.banana', 'layers.9.output'\} do not exist"):
        a.validate(low_graph=teacher)
    with pytest.raises(AlignmentError, match=r"sites \{7\} do not exist"):
        Alignment({"A": 7}).validate(low_graph=teacher)


def test_validate_rejects_keys_missing_from_the_high_graph(student, teacher):
    with pytest.raises(AlignmentError, match=r"keys \{'layers.5.output'\} are not variables"):
        Alignment({L(5): L(0)}).validate(student, teacher)
    with pytest.raises(AlignmentError, match=r"keys \{'Q'\} are not variables"):
        Alignment({"Q": L(0)}).validate(nx.DiGraph([("A", "B")]))


def test_validate_rejects_overlapping_images(teacher):
    with pytest.raises(AlignmentError, match="keys 'A' and 'B' both map to 'layers.1.output'"):
        Alignment({"A": [L(0), L(1)], "B": [L(1), L(2)]}).validate()
    lo, hi = Site(L(1), dims=slice(0, 4)), Site(L(1), dims=slice(4, 8))
    Alignment({"A": lo, "B": hi}).validate(low_graph=teacher)  # disjoint dims of one site are fine
    with pytest.raises(AlignmentError, match="images of distinct keys must be disjoint"):
        Alignment({"A": lo, "B": Site(L(1), dims=[3, 7])}).validate()
    with pytest.raises(AlignmentError, match="images of distinct keys must be disjoint"):
        Alignment({"A": lo, "B": L(1)}).validate()  # the whole site contains the slice
    with pytest.raises(AlignmentError, match="images of distinct keys must be disjoint"):
        Alignment({"A": Site(L(1), positions=[0, 2]), "B": Site(L(1), positions=[2])}).validate()
    Alignment({"A": Site(L(1), positions=[0, 1]), "B": Site(L(1), positions=[2])}).validate()


def test_validate_order_with_site_graphs(student, teacher):
    order = r"'layers.0.output' precedes 'layers.1.output'.*site 'layers.0.output'"
    with pytest.raises(AlignmentError, match=order):
        Alignment({L(0): L(3), L(1): L(0)}).validate(student, teacher)
    # B's site comes before one of A's sites but not before all of them: allowed.
    Alignment({L(0): [L(1), L(3)], L(1): L(2)}).validate(student, teacher)
    # Sub-layer sites are ordered too: attention_output of block 0 comes before block 0's output.
    with pytest.raises(AlignmentError, match="order not kept"):
        Alignment({L(0): L(0), L(1): "layers.0.attention_output"}).validate(student, teacher)


def test_validate_order_with_a_causal_dag(teacher):
    dag = nx.DiGraph([("inputs", "WX"), ("inputs", "YZ"), ("WX", "O"), ("YZ", "O")])
    Alignment({"WX": L(0), "YZ": L(1), "O": L(3)}).validate(dag, teacher)
    Alignment({"WX": L(1), "YZ": L(0)}).validate(dag, teacher)  # WX, YZ unordered: no constraint
    with pytest.raises(AlignmentError, match="'WX' precedes 'O'"):
        Alignment({"WX": L(2), "O": L(1)}).validate(dag, teacher)
    low = nx.DiGraph([("h0", "h1"), ("h1", "h2")])  # a bare DiGraph as the low level works too
    Alignment({"WX": "h0", "O": "h2"}).validate(dag, low)
    with pytest.raises(AlignmentError, match="order not kept"):
        Alignment({"WX": "h2", "O": ["h1"]}).validate(dag, low)


def test_validate_rejects_bad_graph_types(teacher):
    with pytest.raises(AlignmentError, match="high_graph must be a SiteGraph or a networkx DiGraph"):
        Alignment({"A": L(0)}).validate(high_graph={"A": []}, low_graph=teacher)
    with pytest.raises(AlignmentError, match="low_graph must be a SiteGraph or a networkx DiGraph"):
        Alignment({"A": L(0)}).validate(low_graph=[L(0)])


# -- DIITO layer-stride constructors --------------------------------------------------------------
def table(pairs: dict) -> Alignment:
    """A layer table written out by hand: student block -> teacher block(s)."""
    return Alignment({L(s): [L(t) for t in ([ts] if isinstance(ts, int) else ts)] for s, ts in pairs.items()})


def test_full_matches_the_paper_tables():
    assert alignments.full(6, 12) == table(
        {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [6, 7], 4: [8, 9], 5: [10, 11]})
    assert alignments.full(3, 12) == table({0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [8, 9, 10, 11]})
    # Not divisible: the official 9-layer config (multiple_single_multilayer_layer_9.nm).
    assert alignments.full(9, 12) == table(
        {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: 6, 4: 7, 5: 8, 6: 9, 7: 10, 8: 11})
    assert alignments.full(12, 12) == Alignment.identity([L(i) for i in range(12)])
    assert alignments.full(1, 3) == table({0: [0, 1, 2]})


def test_middle_matches_the_paper_tables():
    assert alignments.middle(6, 12) == table({3: 6})
    assert alignments.middle(3, 12) == table({1: 6})
    assert alignments.middle(9, 12) == table({4: 6})  # single_middle_layer_9.nm


def test_late_matches_the_official_configs():
    assert alignments.late(6, 12) == table({3: 9, 4: 10})
    assert alignments.late(3, 12) == table({0: 9, 1: 10})


def test_strided_and_from_layers():
    assert alignments.strided(6, 12) == table({i: 2 * i for i in range(6)})
    assert alignments.strided(6, 12, offset=1) == table({i: 2 * i + 1 for i in range(6)})
    assert alignments.strided(3, 12, width=4) == alignments.full(3, 12)
    assert alignments.strided(2, 12, stride=3, offset=2, width=2) == table({0: [2, 3], 1: [5, 6]})
    assert alignments.from_layers({0: 1, 1: [2, 3]}, 2, 4, kind="mlp_output") == Alignment(
        {"layers.0.mlp_output": "layers.1.mlp_output",
         "layers.1.mlp_output": ["layers.2.mlp_output", "layers.3.mlp_output"]})


@LAWS
@given(st.integers(1, 24), st.integers(0, 24))
def test_full_partitions_the_teacher_in_order(n_student, more):
    n_teacher = n_student + more
    a = alignments.full(n_student, n_teacher)
    assert a.domain == {L(i) for i in range(n_student)}
    groups = [sorted(int(s.split(".")[1]) for s in a[L(i)]) for i in range(n_student)]
    assert [j for g in groups for j in g] == list(range(n_teacher))  # contiguous, ordered, covering
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("make, n_student, n_teacher", [
    (alignments.full, 2, 4), (alignments.full, 3, 4), (alignments.middle, 3, 4),
    (alignments.late, 3, 4), (alignments.strided, 2, 4),
])
def test_constructors_validate_against_real_models(make, n_student, n_teacher):
    a = make(n_student, n_teacher)
    assert a.validate(SiteGraph.from_model(gpt2(n_student)), SiteGraph.from_model(llama(n_teacher))) is a


@pytest.mark.parametrize("call, match", [
    (lambda: alignments.full(0, 12), r"n_student must be an int in 1\.\.12"),
    (lambda: alignments.full(13, 12), r"n_student must be an int in 1\.\.12"),
    (lambda: alignments.middle(6, 0), "n_teacher must be >= 1"),
    (lambda: alignments.middle(2.0, 12), r"n_student must be an int in 1\.\.12"),
    (lambda: alignments.late(2, 12), r"n_student must be an int in 3\.\.12"),
    (lambda: alignments.late(3, 2), "n_teacher must be >= 3"),
    (lambda: alignments.full(True, 12), "n_student must be an int"),
    (lambda: alignments.strided(6, 12, offset=2),
     r"reaches teacher layer 12; valid teacher layers are 0\.\.11"),
    (lambda: alignments.strided(3, 12, stride=2, width=3), "groups would overlap"),
    (lambda: alignments.strided(3, 12, stride=0), "stride must be >= 1"),
    (lambda: alignments.from_layers({4: 0}, 3, 12), r"student layer 4 out of range: valid 0\.\.2"),
    (lambda: alignments.from_layers({0: [11, 12]}, 3, 12), r"teacher layers \[12\].*valid 0\.\.11"),
])
def test_constructor_errors_name_the_valid_range(call, match):
    with pytest.raises(AlignmentError, match=match):
        call()



def test_full_composes_through_a_teaching_assistant():
    assert alignments.full(6, 12) @ alignments.full(3, 6) == alignments.full(3, 12)
    assert alignments.full(3, 6) @ alignments.full(1, 3) == alignments.full(1, 6)


# -- the documentation runs as written ----------------------------------------------------------
DOC = (Path(__file__).resolve().parents[1] / "docs" / "alignment.md").read_text()


def expected_prints(block: str) -> list[str]:
    """The '# ...' comment written after each print(...) in a snippet: on the same line or the next."""
    lines, out = block.splitlines(), []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("print("):
            comment = line.split("#", 1)[1] if "#" in line else lines[i + 1].strip().lstrip("#")
            out.append(comment.strip())
    return out


def test_doc_snippets_run_and_print_what_they_say(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC, re.S)
    assert len(blocks) == 7
    for block in blocks:
        exec(compile(block, "docs/alignment.md", "exec"), {})
        printed = capsys.readouterr().out.splitlines()
        wanted = expected_prints(block)
        assert len(printed) == len(wanted)
        for got, want in zip(printed, wanted, strict=True):
            ok = got.startswith(want[:-3].rstrip()) if want.endswith("...") else got == want
            assert ok, f"printed {got!r}, the docs say {want!r}"
