"""iia, iit_loss and das_loss on tiny networks whose behaviour is known exactly.

The "copy" network keeps the two input bits (A, B) in its hidden layer (optionally rotated by a
known orthogonal Q) and reads out O = A + 2B exactly: logits_k = 2k·s − k² with s = A + 2B, whose
argmax over k ∈ 0..3 is s. Expected accuracies are computed from the dataset's raw values by hand.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from interventions import (
    Alignment,
    AlignmentError,
    CausalModel,
    InterventionError,
    RotatedSubspace,
    Rotation,
    Site,
    das_loss,
    iia,
    iit_loss,
)

LAYER = "module:hidden"


def rot(theta: float) -> torch.Tensor:
    return torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def copy_net(q: torch.Tensor | None = None) -> nn.Sequential:
    """hidden = Q·[A, B]; head undoes Q and scores k ∈ 0..3 by 2k(A + 2B) − k²."""
    q = torch.eye(2) if q is None else q
    hidden = nn.Linear(2, 2, bias=False)
    head = nn.Linear(2, 4)
    k = torch.arange(4.0)
    with torch.no_grad():
        hidden.weight.copy_(q)
        head.weight.copy_(torch.stack([2 * k, 4 * k], 1) @ q.T)
        head.bias.copy_(-k ** 2)
    return nn.Sequential(OrderedDict(hidden=hidden, head=head))


def bits_model() -> CausalModel:
    sampler = lambda n, g: {v: torch.randint(0, 2, (n, 1), generator=g).float() for v in "AB"}
    return CausalModel(["A", "B", "O"], {"O": ["A", "B"]}, {"O": lambda a, b: (a + 2 * b).squeeze(-1).long()},
                       sampler=sampler)


def rotation_with(weight: torch.Tensor) -> Rotation:
    r = Rotation(weight.shape[0])
    with torch.no_grad():
        r.linear.weight = weight
    return r


@pytest.fixture(scope="module")
def data():
    cm, g = bits_model(), torch.Generator().manual_seed(0)
    return cm, {
        "A": cm.sample_counterfactuals(300, "A", g),
        "B": cm.sample_counterfactuals(300, "B", g),
        "A,B": cm.sample_counterfactuals(300, ["A", "B"], g),     # A from source 1, B from source 2
        "AB": cm.sample_counterfactuals(300, [["A", "B"]], g),    # both from one source
    }


def raw(ds, which, i):
    """Column `i` (0 = A, 1 = B) of the base (which=None) or of source `which`."""
    x = ds.base_inputs if which is None else ds.source_inputs[which]
    return x[:, i]


def test_model_is_exactly_the_readout():
    net, x = copy_net(rot(0.4)), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert net(x).argmax(-1).tolist() == [0, 1, 2, 3]


def test_right_alignment_gives_iia_one(data):
    cm, sets = data
    right = Alignment({"A": Site(LAYER, dims=[0]), "B": Site(LAYER, dims=[1])})
    for ds in sets.values():
        assert iia(copy_net(), cm, right, ds).accuracy == 1.0
    res = iia(copy_net(), cm, right, list(sets.values()), batch_size=64)
    assert res.accuracy == 1.0 and res.num_examples == 1200
    assert dict(res.per_variable) == {"A": 1.0, "B": 1.0}


def test_wrong_alignment_gives_hand_computed_iia(data):
    cm, sets = data
    wrong = Alignment({"A": Site(LAYER, dims=[1]), "B": Site(LAYER, dims=[0])})
    a, b = sets["A"], sets["B"]
    # A from source into neuron 1 (B's neuron): prediction A_b + 2 B_s, label A_s + 2 B_b.
    ok_a = (raw(a, None, 0) + 2 * raw(a, 0, 1)) == (raw(a, 0, 0) + 2 * raw(a, None, 1))
    ok_b = (raw(b, 0, 0) + 2 * raw(b, None, 1)) == (raw(b, None, 0) + 2 * raw(b, 0, 1))
    res = iia(copy_net(), cm, wrong, [a, b], batch_size=7)
    assert res.per_variable["A"] == pytest.approx(ok_a.float().mean().item())
    assert res.per_variable["B"] == pytest.approx(ok_b.float().mean().item())
    assert res.accuracy == pytest.approx((ok_a.sum() + ok_b.sum()).item() / 600)
    assert res.accuracy < 0.5
    # Two sources at one layer: neuron 0 gets A from source 2 (B's), neuron 1 B from source 1.
    ab = sets["A,B"]
    ok = (raw(ab, 1, 0) + 2 * raw(ab, 0, 1)) == (raw(ab, 0, 0) + 2 * raw(ab, 1, 1))
    assert iia(copy_net(), cm, wrong, ab).accuracy == pytest.approx(ok.float().mean().item())


def test_readout_and_batch_size(data):
    cm, sets = data
    right = Alignment({"A": Site(LAYER, dims=[0]), "B": Site(LAYER, dims=[1])})
    zero = iia(copy_net(), cm, right, sets["A"], readout=lambda out: torch.zeros(out.shape[0], dtype=torch.long))
    assert zero.accuracy == pytest.approx((sets["A"].labels == 0).float().mean().item())
    wrong = Alignment({"A": Site(LAYER, dims=[1]), "B": Site(LAYER, dims=[0])})
    assert iia(copy_net(), cm, wrong, sets["A,B"], batch_size=1).accuracy == \
        iia(copy_net(), cm, wrong, sets["A,B"], batch_size=1000).accuracy


def test_rotated_dims_read_in_the_rotated_basis(data):
    cm, sets = data
    q = rot(math.pi / 6)
    net = copy_net(q)
    r = rotation_with(q.T)                    # R·h = Qᵀ Q x = x: coordinate 0 is A, 1 is B
    dims = Alignment({"A": Site(LAYER, dims=[0]), "B": Site(LAYER, dims=slice(1, 2))})
    for key in ("A", "B", "A,B", "AB"):
        assert iia(net, cm, dims, sets[key], rotation=r).accuracy == 1.0
        assert iia(net, cm, dims, sets[key], rotation={LAYER: r}).accuracy == 1.0
    # The same through one RotatedSubspace intervention per key on the whole layer.
    whole = Alignment({"A": LAYER, "B": LAYER})
    per_key = {"A": RotatedSubspace(2, slice(0, 1), rotation=r)}
    per_key["B"] = per_key["A"].with_subspace(slice(1, 2))
    assert iia(net, cm, whole, sets["A,B"], interventions=per_key).accuracy == 1.0
    # Raw neurons of the rotated network: hand-computed (splice neuron 0, undo Q, round by argmax).
    a = sets["A"]
    hb, hs = a.base_inputs @ q.T, a.source_inputs[0] @ q.T
    mixed = torch.stack([hs[:, 0], hb[:, 1]], 1) @ q      # back to (A, B) coordinates: x = Qᵀh
    s = mixed[:, 0] + 2 * mixed[:, 1]
    k = torch.arange(4.0)
    pred = (2 * k * s[:, None] - k ** 2).argmax(-1)
    expected = (pred == a.labels).float().mean().item()
    assert iia(net, cm, dims, a).accuracy == pytest.approx(expected)
    assert expected < 0.95


def test_iia_validates_before_running(data):
    cm, sets = data
    net = copy_net()
    only_a = Alignment({"A": Site(LAYER, dims=[0])})
    with pytest.raises(AlignmentError, match="B"):
        iia(net, cm, only_a, sets["B"])
    r = Rotation(2)
    with pytest.raises(AlignmentError, match="rank"):
        iia(net, cm, Alignment({"A": Site(LAYER, dims=[5])}), sets["A"], rotation=r)
    with pytest.raises(InterventionError, match="batch_size"):
        iia(net, cm, only_a, sets["A"], batch_size=0)
    with pytest.raises(InterventionError, match="CounterfactualDataset"):
        iia(net, cm, only_a, [])
    with pytest.raises(AlignmentError, match="not alignment keys"):
        iia(net, cm, only_a, sets["A"], interventions={"Q": lambda b, s: s})


def test_iia_restores_mode_and_takes_no_gradients(data):
    cm, sets = data
    net = copy_net().train()
    iia(net, cm, Alignment({"A": Site(LAYER, dims=[0])}), sets["A"])
    assert net.training
    assert all(p.grad is None for p in net.parameters())


# -- iit_loss ------------------------------------------------------------------------------------
def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(l1=nn.Linear(2, 4), act=nn.Tanh(), l2=nn.Linear(4, 4), head=nn.Linear(4, 4)))


def test_iit_loss_equals_hand_spliced_forward_and_reaches_every_parameter(data):
    _, sets = data
    net = small_mlp()
    alignment = Alignment({"A": Site("module:l2", dims=[0, 1]), "B": Site("module:l2", dims=[2, 3])})
    batch = sets["A,B"][:50]
    loss = iit_loss(net, batch, alignment)
    loss.backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    assert all(g.abs().sum() > 0 for g in got.values()), "every parameter should get a gradient"

    # The oracle: splice by hand (A's dims from source 1, B's from source 2), same loss and grads.
    ref = small_mlp()
    hidden = lambda x: ref.l2(ref.act(ref.l1(x)))
    h1, h2 = hidden(batch.source_inputs[0]), hidden(batch.source_inputs[1])
    spliced = torch.cat([h1[:, :2], h2[:, 2:]], 1)
    want = F.cross_entropy(ref.head(spliced), batch.labels)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7)


def test_das_loss_trains_only_the_rotation(data):
    _, sets = data
    net = small_mlp()
    r = Rotation(4)
    alignment = Alignment({"A": Site("module:l2", dims=[0, 1]), "B": Site("module:l2", dims=[2, 3])})
    das_loss(net, sets["A,B"][:40], alignment, rotation=r).backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters()), "requires_grad is restored"
    assert sum(float(p.grad.abs().sum()) for p in r.parameters()) > 0
    with pytest.raises(InterventionError, match="train"):
        das_loss(net, sets["A"], alignment)


def test_das_training_increases_iia(data):
    cm, sets = data
    q = rot(math.pi / 6)
    net = copy_net(q)
    r = rotation_with(rot(0.6) @ q.T)        # 34° away from the right basis: A and B mixed
    alignment = Alignment({"A": Site(LAYER, dims=[0]), "B": Site(LAYER, dims=[1])})
    train = [sets["A"], sets["B"], sets["A,B"]]
    before = iia(net, cm, alignment, train, rotation=r).accuracy
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    for _ in range(30):
        for ds in train:
            for batch in ds.batches(100):
                loss = das_loss(net, batch, alignment, rotation=r)
                opt.zero_grad()
                loss.backward()
                opt.step()
    held_out = bits_model().sample_counterfactuals(300, ["A", "B"], torch.Generator().manual_seed(9))
    after = iia(net, cm, alignment, held_out, rotation=r).accuracy
    assert before < 0.8
    assert after >= 0.99
