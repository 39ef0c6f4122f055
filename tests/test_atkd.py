"""ATKD: the per-token decomposition against an explicit float64 oracle, and the objective's rules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from applications.distill.objectives.atkd import (
    ATKDConfig,
    atkd_loss,
    hard_mask,
    kd_decomposition,
    teacher_uncertainty,
    unsupported_kd,
)
from interventions import InterventionError


def oracle(p: torch.Tensor, q: torch.Tensor, g: int):
    """KL, TKD, DKD, UNC for one token by deleting the target column explicitly (float64)."""
    kl = (p * (p.log() - q.log())).sum()
    p_rest, q_rest = torch.cat([p[:g], p[g + 1:]]), torch.cat([q[:g], q[g + 1:]])
    # 1 - x_g as the sum of the other classes: exact even when x_g rounds to 1
    bp, bq = torch.stack([p[g], p_rest.sum()]), torch.stack([q[g], q_rest.sum()])
    tkd = (bp * (bp.log() - bq.log())).sum()
    p_hat, q_hat = p_rest / p_rest.sum(), q_rest / q_rest.sum()
    dkd = (p_hat * (p_hat.log() - q_hat.log())).sum()
    return kl, tkd, dkd, p_rest.sum()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(3, 40), sharp=st.sampled_from([0.5, 1.0, 4.0, 12.0]),
       reverse=st.booleans(), temperature=st.sampled_from([1.0, 2.0]))
def test_decomposition_matches_oracle_and_identity(seed, vocab, sharp, reverse, temperature):
    gen = torch.Generator().manual_seed(seed)
    zt = torch.randn(2, 3, vocab, generator=gen) * sharp  # sharp=12: near-one-hot teachers
    zs = torch.randn(2, 3, vocab, generator=gen) * 2
    targets = torch.randint(0, vocab, (2, 3), generator=gen)
    tkd, dkd, unc = kd_decomposition(zt, zs, targets, reverse=reverse, temperature=temperature)
    p = torch.softmax(zt.double() / temperature, -1)
    q = torch.softmax(zs.double() / temperature, -1)
    if reverse:
        p, q = q, p
    for b in range(2):
        for s in range(3):
            kl, o_tkd, o_dkd, o_unc = oracle(p[b, s], q[b, s], int(targets[b, s]))
            assert abs(float(tkd[b, s]) + float(unc[b, s]) * float(dkd[b, s]) - float(kl)) <= 1e-5 * max(1, float(kl))
            assert abs(float(tkd[b, s]) - float(o_tkd)) <= 1e-5 * max(1, float(o_tkd))
            assert abs(float(unc[b, s]) - float(o_unc)) <= 1e-5
            if float(o_unc) > 1e-4:  # DKD is only defined while some mass is off the target
                assert abs(float(dkd[b, s]) - float(o_dkd)) <= 1e-4 * max(1, float(o_dkd))


def test_one_hot_teacher_is_finite():
    zt = torch.full((1, 1, 5), -1e4)
    zt[0, 0, 2] = 1e4
    zs = torch.randn(1, 1, 5)
    tkd, dkd, unc = kd_decomposition(zt, zs, torch.tensor([[2]]))
    assert torch.isfinite(tkd).all() and torch.isfinite(dkd).all()
    assert float(unc) == 0.0
    kl = -torch.log_softmax(zs, -1)[0, 0, 2]
    assert torch.allclose(tkd[0, 0], kl, atol=1e-5)


def test_hard_mask_splits_valid_tokens_by_uncertainty():
    unc = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.3, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    batch = hard_mask(unc, valid, 0.5, "batch")  # 7 valid -> ceil(3.5) = 4 hard: 0.9, 0.8, 0.7, 0.5
    assert batch.tolist() == [[True, False, True, True], [False, True, False, False]]
    seq = hard_mask(unc, valid, 0.5, "sequence")  # row 0: 2 of 4; row 1: ceil(1.5) = 2 of 3
    assert seq.tolist() == [[True, False, False, True], [False, True, True, False]]
    glob = hard_mask(unc, valid, 0.5, "global", threshold=0.6)
    assert glob.tolist() == [[True, False, False, True], [False, True, False, False]]


def test_atkd_loss_is_the_weighted_sum_of_its_parts():
    torch.manual_seed(0)
    zt, zs = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    cfg = ATKDConfig(lam=0.2, hard_fraction=0.5)
    loss, stats = atkd_loss(zt, zs, targets, mask, cfg)
    tkd, dkd, _ = kd_decomposition(zt, zs, targets)
    unc = 1 - torch.softmax(zt, -1).gather(-1, targets[..., None])[..., 0]
    order = sorted([(float(unc[b, s]), b, s) for b in range(2) for s in range(5) if mask[b, s]], reverse=True)
    hard = {(b, s) for _, b, s in order[:4]}  # 8 valid tokens -> 4 hard
    easy = {(b, s) for _, b, s in order[4:]}
    want = 0.2 * sum(float(dkd[i]) for i in easy) / 4 + 0.8 * sum(float(tkd[i] + dkd[i]) for i in hard) / 4
    assert abs(float(loss) - want) < 1e-5
    assert stats["atkd_hard_share"] == 0.5


def test_atkd_gradients_reach_the_student_only():
    zt = torch.randn(1, 4, 7, requires_grad=True)
    zs = torch.randn(1, 4, 7, requires_grad=True)
    loss, _ = atkd_loss(zt, zs, torch.randint(0, 7, (1, 4)), torch.ones(1, 4))
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0


def test_teacher_uncertainty_is_one_minus_target_probability():
    zt = torch.randn(2, 3, 6)
    t = torch.randint(0, 6, (2, 3))
    want = 1 - torch.softmax(zt, -1).gather(-1, t[..., None])[..., 0]
    assert torch.allclose(teacher_uncertainty(zt, t), want, atol=1e-6)


def test_bad_inputs():
    z = torch.randn(1, 3, 5)
    with pytest.raises(InterventionError, match=r"targets \[7\] outside the vocabulary \(valid 0\.\.4\)"):
        atkd_loss(z, z, torch.tensor([[0, 7, 1]]), torch.ones(1, 3))
    with pytest.raises(InterventionError, match="no valid tokens"):
        atkd_loss(z, z, torch.tensor([[0, 1, 1]]), torch.zeros(1, 3))
    with pytest.raises(InterventionError, match="differ"):
        atkd_loss(z, torch.randn(1, 3, 6), torch.tensor([[0, 1, 1]]), torch.ones(1, 3))
    with pytest.raises(InterventionError, match="hard fraction"):
        ATKDConfig(hard_fraction=1.0)
    with pytest.raises(InterventionError, match="no exact"):
        unsupported_kd("tvd")
    # ignored positions may hold out-of-vocabulary labels such as -100
    loss, _ = atkd_loss(z, z, torch.tensor([[0, -100, 1]]), torch.tensor([[1, 0, 1]]))
    assert torch.isfinite(loss)
