"""TED's model-independent parts: layer pairing, filters, and the stage losses against hand-written math."""

from __future__ import annotations

import math

import pytest
import torch

from applications.distill.objectives.ted import (
    TEDConfig,
    TEDFilters,
    filtered_layers,
    kd_kl,
    masked_mse,
    pair_layers,
    stage1_loss,
    stage2_loss,
)
from interventions import InterventionError


def test_filtered_layers_and_pairing():
    assert filtered_layers(12, 2) == [1, 3, 5, 7, 9, 11]
    assert filtered_layers(6, 1) == [0, 1, 2, 3, 4, 5]
    assert pair_layers(12, 2, 6, 1) == [(1, 0), (3, 1), (5, 2), (7, 3), (9, 4), (11, 5)]
    assert pair_layers(4, 4, 2, 2) == [(3, 1)]


def test_mismatched_layer_counts_are_refused():
    with pytest.raises(InterventionError, match=r"does not divide the model's 6 layers \(valid intervals: \[1, 2, 3, 6\]\)"):
        filtered_layers(6, 4)
    with pytest.raises(InterventionError, match="has 6 filters but student .* has 3"):
        pair_layers(12, 2, 6, 2)


def test_masked_mse_ignores_padding():
    a, b = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert math.isclose(float(masked_mse(a, b, mask)), (1 + 4) / 2)
    with pytest.raises(InterventionError, match="no non-padding"):
        masked_mse(a, b, torch.zeros(1, 3))


def test_kd_kl_by_hand():
    t, s = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]  # softmax([1, 0]) at T = 2
    want = sum(pi * math.log(pi / 0.5) for pi in p) * 4
    assert math.isclose(float(kd_kl(t, s, 2.0)), want, rel_tol=1e-6)


def test_stage1_is_the_mean_of_per_filter_task_losses():
    torch.manual_seed(0)
    filt = TEDFilters([0, 1], d_model=4, width=6, kind="linear", task="classification", num_outputs=3)
    hidden = [torch.randn(5, 7, 4), torch.randn(5, 7, 4)]
    labels = torch.randint(0, 3, (5,))
    want = []
    for f, head, h in zip(filt.filters, filt.heads, hidden):
        z = h[:, 0] @ f.weight.T + f.bias
        pooled = torch.tanh(z @ head.pooler[0].weight.T + head.pooler[0].bias)
        logits = pooled @ head.out.weight.T + head.out.bias
        want.append(torch.nn.functional.cross_entropy(logits, labels))
    assert torch.allclose(stage1_loss(filt, hidden, labels, "classification"), torch.stack(want).mean(), atol=1e-6)


def _stage2_inputs():
    torch.manual_seed(1)
    return dict(student_logits=torch.randn(3, 2, requires_grad=True), teacher_logits=torch.randn(3, 2),
                labels=torch.tensor([0, 1, 1]), task="classification",
                student_states=[torch.randn(3, 4, 4)], teacher_states=[torch.randn(3, 4, 8)],
                mask=torch.tensor([[1, 1, 1, 0]] * 3))


def test_stage2_modes():
    x = _stage2_inputs()
    kd_loss, kd_parts = stage2_loss(TEDConfig(mode="kd"), **x)
    assert set(kd_parts) == {"task", "kl"}
    assert math.isclose(float(kd_loss.detach()), kd_parts["task"] + kd_parts["kl"], rel_tol=1e-6)
    student = TEDFilters([0], 4, 8, "linear", "classification", 2)
    teacher = TEDFilters([0], 8, 8, "linear", "classification", 2)
    cfg = TEDConfig(mode="ted", alpha_mse=10.0)
    loss, parts = stage2_loss(cfg, **x, student_filters=student, teacher_filters=teacher)
    # Oracle by hand, token by token (the old check compared masked_mse with itself and the total with the
    # returned parts, so an MSE that averaged over padding, a KL in the wrong direction or without T^2, or a
    # wrong task loss would all have passed).
    fs = student.filters[0](x["student_states"][0]).detach()
    ft = teacher.filters[0](x["teacher_states"][0]).detach()
    cells = [((fs[b, i] - ft[b, i]) ** 2).mean() for b in range(3) for i in range(4) if x["mask"][b, i]]
    want_mse = sum(float(c) for c in cells) / len(cells)
    unmasked = float(((fs - ft) ** 2).mean())
    assert not math.isclose(want_mse, unmasked, rel_tol=1e-3)  # the padded position does matter here
    s_logits, t_logits, T = x["student_logits"].detach(), x["teacher_logits"], 2.0
    want_task = sum(-math.log(math.exp(s_logits[b, y]) / sum(math.exp(v) for v in s_logits[b].tolist()))
                    for b, y in enumerate(x["labels"].tolist())) / 3
    kls = []
    for b in range(3):
        p = [math.exp(v / T) for v in t_logits[b].tolist()]
        q = [math.exp(v / T) for v in s_logits[b].tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    want_kl = T * T * sum(kls) / 3
    assert math.isclose(parts["mse"], want_mse, rel_tol=1e-5)
    assert math.isclose(parts["task"], float(want_task), rel_tol=1e-5)
    assert math.isclose(parts["kl"], want_kl, rel_tol=1e-5)
    assert math.isclose(float(loss.detach()), float(want_task) + want_kl + 10.0 * want_mse, rel_tol=1e-5)
    loss.backward()
    assert teacher.filters[0].weight.grad is None  # the teacher's filters stay frozen in stage 2
    assert student.filters[0].weight.grad is not None
    lwd_loss, lwd_parts = stage2_loss(TEDConfig(mode="lwd"), **x, student_filters=student)
    want = masked_mse(student.filters[0](x["student_states"][0]), x["teacher_states"][0], x["mask"])
    assert math.isclose(lwd_parts["mse"], float(want.detach()), rel_tol=1e-5)


def test_stage2_without_stage1_filters_is_refused():
    x = _stage2_inputs()
    with pytest.raises(InterventionError, match="run stage 1 first"):
        stage2_loss(TEDConfig(mode="ted"), **x)
    with pytest.raises(InterventionError, match="teacher's stage-1 filters"):
        stage2_loss(TEDConfig(mode="ted"), **x, student_filters=TEDFilters([0], 4, 8, "linear", "classification", 2))
