"""The DIITO study pipeline at toy size: runs end to end, caches every finished piece, resumes, reports."""

from __future__ import annotations

import json
import math
import os

import pytest
from conftest import run_study_twice

from benchmarks import study_diito as sd

SMOKE = ["--smoke", "--variants", "standard", "full", "--seeds", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """One smoke study, then a second invocation of the same command on the same cache."""
    tmp = tmp_path_factory.mktemp("study")
    report = tmp / "docs" / "results.md"
    report.parent.mkdir()
    report.write_text("# Results\n\n## Someone else's study\n\nTheir text.\n")
    argv = SMOKE + ["--work", str(tmp / "work"), "--report", str(report)]
    first, second, stamps = run_study_twice(sd.main, argv, tmp / "work")
    return tmp, report, first, second, stamps


def test_first_invocation_runs_every_piece(two_runs):
    tmp, _, first, _, _ = two_runs
    runs = [f"{v}-L{L}-s0" for v in ("standard", "full") for L in (3, 2)]  # both depths by default
    assert sorted(first["ran"]) == sorted(runs + ["sst:teacher"] + [f"sst:{r}" for r in runs])
    assert first["reused"] == [] and first["busy"] == []
    for name in ("standard-L3", "full-L3", "standard-L2", "full-L2"):
        r = first["rows"][name][0]
        assert r["steps"] == sd.SMOKE.student_steps
        assert 1.0 < r["perplexity"] < math.inf
        assert 0.0 <= r["iia"] <= 1.0
        assert 0.0 <= r["sst"] <= 1.0
        assert r["command"].startswith("python -m applications.distill train ")
        assert f"--max-steps {sd.SMOKE.student_steps}" in r["command"]
    # The DIITO run was given the diito recipe, the baseline the standard one (read back from the run's config).
    cfg = json.loads((tmp / "work" / "runs" / "full-L3-s0" / "distill_config.json").read_text())
    assert cfg["resolved_objectives"] == {"ce": 0.25, "mlm": 0.25, "cos": 0.25, "diito": 0.25}
    cfg = json.loads((tmp / "work" / "runs" / "standard-L3-s0" / "distill_config.json").read_text())
    assert set(cfg["resolved_objectives"]) == {"ce", "mlm", "cos"}


def test_second_invocation_reuses_finished_runs(two_runs):
    _, _, first, second, stamps = two_runs
    assert second["ran"] == []
    assert sorted(second["reused"]) == sorted(first["ran"])
    assert second["rows"] == first["rows"]
    assert {p: os.path.getmtime(p) for p in stamps} == stamps  # nothing rewritten


def test_report_section_added_and_others_kept(two_runs):
    _, report, _, _, _ = two_runs
    text = report.read_text()
    assert text.startswith("# Results\n\n## Someone else's study\n\nTheir text.\n")
    assert text.count(sd.HEADING) == 1
    assert "| 3 layers | DIITO FULL | 1/1 |" in text and "| 2 layers | DIITO FULL | 1/1 |" in text
    assert "Δ perplexity vs standard, paired" in text
    assert "**Partial study.**" not in text  # every requested run finished
    assert (report.parent / "study_diito.png").stat().st_size > 0


def test_write_section_replaces_only_the_generated_block(tmp_path):
    md = tmp_path / "results.md"
    md.write_text(f"# R\n\n{sd.HEADING}\n\nmy reading\n\n## ATKD\n\natkd text\n")
    sd.write_section(md, "table v1")
    sd.write_section(md, "table v2")
    assert md.read_text() == (f"# R\n\n{sd.HEADING}\n\n{sd.START}\ntable v2\n{sd.END}\n\nmy reading\n\n"
                              "## ATKD\n\natkd text\n")


def test_missing_data_skips_with_a_message(tmp_path):
    said = []
    out = sd.main(["--data", str(tmp_path / "absent"), "--work", str(tmp_path / "w")], log=said.append)
    assert out["skipped"] is True
    assert said and said[0].startswith("skipped:") and "wikitext-2" in said[0]
    assert not (tmp_path / "w").exists()


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    lock = tmp_path / "run.lock"
    lock.write_text(str(os.getppid()))  # a live process that is not us
    with pytest.raises(sd.Busy), sd.Lock(lock):
        pass
    lock.write_text("999999999")  # no such process
    with sd.Lock(lock):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


def test_paired_differences_match_seeds_and_skip_unpaired():
    rows = {("standard", 3): {0: {"perplexity": 10.0}, 1: {"perplexity": 12.0}},
            ("full", 3): {0: {"perplexity": 9.0}, 1: {"perplexity": 12.5}, 2: {"perplexity": 1.0}}}
    assert sd.paired(rows, "full", 3, "perplexity") == [-1.0, 0.5]  # seed 2 has no standard run to pair with
    assert sd.paired(rows, "full", 2, "perplexity") == []


def test_step_seconds_counts_only_the_steps_this_invocation_took(tmp_path):
    (tmp_path / "log.csv").write_text("step,key,value\n200,train_runtime,50.0\n")
    assert sd._step_seconds(tmp_path, 99.0, 100) == 0.5  # resumed at 100: the runtime covers 100 steps
    assert sd._step_seconds(tmp_path, 99.0, 0) is None  # restored a finished checkpoint: no step taken


def test_time_matched_control_is_the_only_run_with_other_steps(tmp_path):
    steps = {v: sd.train_argv(tmp_path, sd.SMOKE, v, 3, 0) for v in sd.VARIANTS}
    steps = {v: int(a[a.index("--max-steps") + 1]) for v, a in steps.items()}
    assert steps.pop("standard_long") == round(1.5 * sd.SMOKE.student_steps)
    assert set(steps.values()) == {sd.SMOKE.student_steps}
