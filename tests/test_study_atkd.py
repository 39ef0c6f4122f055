"""The ATKD study at toy size: runs end to end, caches and resumes, reports; its DKD-share diagnostic."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from conftest import run_study_twice

from benchmarks import study_atkd as sa

SMOKE = ["--smoke", "--seeds", "0", "--sweep-seeds", "0", "--synthetic-seeds", "0", "--sharp-seeds", "0", "--threads", "1"]
GROUPS = ["today-s0", "memorised-s0", "synthetic-s0", "sweep-s0", "sharp-s0"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """One smoke study, then a second invocation of the same command on the same cache."""
    tmp = tmp_path_factory.mktemp("study")
    report = tmp / "docs" / "results.md"
    report.parent.mkdir()
    report.write_text(f"# Results\n\n{sa.HEADING}\n\nmy reading\n\n## Someone else's study\n\nTheir text.\n")
    argv = SMOKE + ["--work", str(tmp / "work"), "--report", str(report)]
    first, second, stamps = run_study_twice(sa.main, argv, tmp / "work")
    return tmp, report, first, second, stamps


def test_first_invocation_runs_every_group(two_runs):
    tmp, _, first, _, _ = two_runs
    assert sorted(first["ran"]) == sorted(GROUPS) and first["busy"] == []
    expected = {f"{v}:{m}" for _, members in sa.GROUPS.values() for v, m in members}
    assert set(first["runs"]) == expected
    for runs in first["runs"].values():
        r = runs[0]
        assert 1.0 < r["perplexity"] < math.inf and r["seed"] == 0
        for when in ("diag_init", "diag_end"):
            shares = r[when]
            assert shares["hard"]["tokens"] + shares["easy"]["tokens"] == shares["all"]["tokens"]
            assert shares["hard"]["unc"] >= shares["easy"]["unc"]  # hard = the most uncertain
    for name in ("today", "memorised", "synthetic"):
        assert (tmp / "work" / f"teacher-{name}" / "model.pt").is_file()
    assert not list((tmp / "work").rglob("state.pt"))  # finished groups leave no checkpoint


def test_second_invocation_reuses_every_piece(two_runs):
    _, _, first, second, stamps = two_runs
    assert second["ran"] == [] and sorted(second["reused"]) == sorted(GROUPS)
    assert second["runs"] == first["runs"]
    assert {p: os.path.getmtime(p) for p in stamps} == stamps  # nothing recomputed or rewritten


def test_report_section_written_and_others_kept(two_runs):
    _, report, _, _, _ = two_runs
    text = report.read_text()
    assert text.startswith(f"# Results\n\n{sa.HEADING}\n\n<!-- {sa.NAME}: generated, start -->")
    assert text.count(sa.HEADING) == 1 and text.count(f"<!-- {sa.NAME}: generated, end -->") == 1
    assert "\n\nmy reading\n\n## Someone else's study\n\nTheir text.\n" in text
    assert "Partial study" not in text
    assert "Δ ATKD − KD, paired" in text and "UNC·DKD / KL" in text and "atkd-hard0.75" in text
    assert "**synthetic** grammar corpus" in text
    assert (report.parent / "study_atkd_unc.png").stat().st_size > 0


def test_lockstep_student_trains_as_it_would_alone(two_runs, monkeypatch):
    """A student trained alone matches the same student trained in its group (same init, batches, dropout)."""
    tmp, _, first, _, _ = two_runs
    monkeypatch.setitem(sa.GROUPS, "alone", ("today", [("sharp", "atkd")]))
    work = tmp / "work"
    alone = sa.train_group(work, sa.prepare_data(work, None, sa.SMOKE, True), sa.SMOKE, "alone", 0)
    got, want = alone["students"]["sharp:atkd"], first["runs"]["sharp:atkd"][0]
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert got["final_loss"] == pytest.approx(want["final_loss"], rel=1e-6)


def test_killed_group_resumes_to_the_same_result(two_runs, tmp_path):
    tmp, _, first, _, _ = two_runs
    work = tmp_path / "work"
    shutil.copytree(tmp / "work", work, ignore=shutil.ignore_patterns("groups"))
    info = sa.prepare_data(work, None, sa.SMOKE, True)
    with pytest.raises(sa.Stopped):
        sa.train_group(work, info, sa.SMOKE, "memorised", 0, stop_at=3)
    assert (work / "groups" / "memorised-s0" / "state.pt").is_file()
    resumed = sa.train_group(work, info, sa.SMOKE, "memorised", 0)
    assert resumed["resumed_from"] == 3
    for key, r in resumed["students"].items():
        assert r["perplexity"] == pytest.approx(first["runs"][key][0]["perplexity"], rel=1e-6)


def test_missing_data_skips_with_a_message(tmp_path):
    said = []
    out = sa.main(["--data", str(tmp_path / "absent"), "--work", str(tmp_path / "w")], log=said.append)
    assert out == {"skipped": True}
    assert said and said[0].startswith("skipped:") and "test.txt" in said[0]
    assert not (tmp_path / "w").exists()


def _hand_share(t_logits, s_logits, targets, fraction):
    """UNC·DKD / KL per group, written out with Python floats (no code of the module under test)."""
    rows = []
    for t_row, s_row, g in zip(t_logits.tolist(), s_logits.tolist(), targets.tolist()):
        zt, zs = sum(math.exp(x) for x in t_row), sum(math.exp(x) for x in s_row)
        p, q = [math.exp(x) / zt for x in t_row], [math.exp(x) / zs for x in s_row]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        unc = 1.0 - p[g]
        ph = [pi / (1 - p[g]) for i, pi in enumerate(p) if i != g]
        qh = [qi / (1 - q[g]) for i, qi in enumerate(q) if i != g]
        dkd = sum(a * math.log(a / b) for a, b in zip(ph, qh))
        tkd = p[g] * math.log(p[g] / q[g]) + (1 - p[g]) * math.log((1 - p[g]) / (1 - q[g]))
        assert tkd + unc * dkd == pytest.approx(kl, rel=1e-9)  # the decomposition itself
        rows.append((unc, dkd, kl))
    ranked = sorted(range(len(rows)), key=lambda i: -rows[i][0])
    hard = set(ranked[: math.ceil(len(rows) * fraction)])

    def share(ix):
        return sum(rows[i][0] * rows[i][1] for i in ix) / sum(rows[i][2] for i in ix)

    easy = [i for i in range(len(rows)) if i not in hard]
    return {"hard": share(hard), "easy": share(easy), "all": share(range(len(rows))),
            "hard_unc": sum(rows[i][0] for i in hard) / len(hard)}


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_dkd_share_matches_a_hand_computation(fraction):
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(8, 6, generator=g, dtype=torch.float64) * 2
    s_logits = torch.randn(8, 6, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 6, (8,), generator=g)
    t_logits[0, targets[0]] += 6.0  # one confident token (UNC near 0): DKD's weight almost vanishes there
    got = sa.dkd_share(t_logits, s_logits, targets, fraction)
    want = _hand_share(t_logits, s_logits, targets, fraction)
    for group in ("hard", "easy", "all"):
        assert got[group]["share"] == pytest.approx(want[group], rel=1e-5)
    assert got["hard"]["unc"] == pytest.approx(want["hard_unc"], rel=1e-5)
    assert got["hard"]["tokens"] == math.ceil(8 * fraction)
    assert 0.0 < got["easy"]["share"] < 1.0


def test_dkd_share_of_a_one_hot_like_teacher_is_near_zero():
    """A teacher sure of every gold token leaves (almost) nothing of KL to DKD: ATKD's premise."""
    targets = torch.tensor([0, 1, 2, 3])
    t_logits = torch.full((4, 5), -8.0, dtype=torch.float64)
    t_logits[torch.arange(4), targets] = 8.0
    s_logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = sa.dkd_share(t_logits, s_logits, targets)
    assert got["all"]["share"] < 1e-4 and got["all"]["unc"] < 1e-5


def test_a_group_whose_students_were_trained_elsewhere_is_covered():
    runs = {("sharp", "kd"): {0: {}, 1: {}}, ("sharp", "atkd"): {0: {}}}
    assert sa.covered(runs, "sharp", 0)  # e.g. both trained in a larger lockstep group of seed 0
    assert not sa.covered(runs, "sharp", 1) and not sa.covered(runs, "today", 0)
