"""The study scripts' shared pieces: the resumable cache, its lock, seed statistics, the report section;
and the DIITO time-matched study at toy size (end to end, resumed, reported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_study_twice

from benchmarks import studies
from benchmarks import study_diito_matched as sm


def test_cached_computes_once_then_reuses(tmp_path):
    calls = []

    def compute(folder):
        calls.append(folder)
        (folder / "partial.txt").write_text("state a resumed run could use")
        return {"value": 3}

    first = studies.cached(tmp_path / "piece", compute)
    second = studies.cached(tmp_path / "piece", compute)
    assert first == ({"value": 3}, False) and second == ({"value": 3}, True)
    assert calls == [tmp_path / "piece"]
    assert not (tmp_path / "piece.lock").exists()  # released


def test_cached_piece_that_fails_is_redone_and_keeps_its_partial_state(tmp_path):
    def dies(folder):
        (folder / "checkpoint").write_text("step 5")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        studies.cached(tmp_path / "piece", dies)
    assert not (tmp_path / "piece" / "result.json").exists()
    assert not (tmp_path / "piece.lock").exists()
    seen = studies.cached(tmp_path / "piece", lambda f: {"resumed_from": (f / "checkpoint").read_text()})
    assert seen == ({"resumed_from": "step 5"}, False)


def test_lock_held_by_a_live_process_is_busy_and_a_dead_one_is_taken_over(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "piece.lock").write_text(str(live.pid))
        with pytest.raises(studies.Busy):
            studies.cached(tmp_path / "piece", lambda f: {"x": 1})
    finally:
        live.kill()
        live.wait()
    (tmp_path / "piece.lock").write_text(str(live.pid))  # now dead
    assert studies.cached(tmp_path / "piece", lambda f: {"x": 1}) == ({"x": 1}, False)


def test_mean_std_and_paired():
    assert studies.mean_std([]) == "—"
    assert studies.mean_std([2.0]) == "2.00 (1 seed)"
    assert studies.mean_std([1.0, 3.0]) == "2.00 ± 1.41"
    assert studies.mean_std([-1.0, -3.0], "+.1f") == "-2.0 ± 1.4"
    runs, base = {0: {"p": 5.0}, 1: {"p": 7.0}, 2: {"p": 1.0}}, {0: {"p": 4.0}, 2: {"p": 3.0}}
    assert studies.paired(runs, base, "p") == [1.0, -2.0]  # seed 1 has no baseline: left out
    assert studies.paired({0: 2.0}, {0: 0.5}) == [1.5]


def test_write_section_keeps_the_rest(tmp_path):
    md = tmp_path / "results.md"
    md.write_text("# R\n\n## A\n\nmine\n\n## B\n\ntheirs\n")
    studies.write_section(md, "## A", "table 1", "a")
    studies.write_section(md, "## A", "table 2", "a")
    studies.write_section(md, "## C", "new", "c")
    start, end = studies.markers("a")
    c_start, c_end = studies.markers("c")
    assert md.read_text() == (f"# R\n\n## A\n\n{start}\ntable 2\n{end}\n\nmine\n\n## B\n\ntheirs\n\n"
                              f"## C\n\n{c_start}\nnew\n{c_end}\n")


@pytest.fixture(scope="module")
def matched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matched")
    report = tmp / "results.md"
    report.write_text("# Results\n\n## Other\n\ntext\n")
    argv = ["--smoke", "--budgets", "2", "--seeds", "0", "--work", str(tmp / "w"), "--report", str(report)]
    first, second, stamps = run_study_twice(sm.main, argv, tmp / "w")
    return tmp, report, first, second, stamps


def test_matched_study_runs_the_three_students_with_their_budgets(matched):
    tmp, _, first, _, _ = matched
    assert sorted(first["ran"]) == sorted(f"2:{v}-L3-s0" for v in sm.VARIANTS)
    rows = first["rows"]["2"]
    assert rows["standard"][0]["steps"] == rows["full"][0]["steps"] == 2
    assert rows[sm.sd.MATCHED][0]["steps"] == round(2 * sm.RATIO) == 3
    cfg = json.loads((tmp / "w" / "steps2" / "runs" / "full-L3-s0" / "distill_config.json").read_text())
    assert "diito" in cfg["resolved_objectives"]
    teacher = json.loads((tmp / "w" / "teacher" / "result.json").read_text())
    assert rows["full"][0]["teacher_perplexity"] == pytest.approx(teacher["perplexity"])  # the one shared teacher


def test_matched_study_resumes_from_its_cache(matched):
    _, _, first, second, stamps = matched
    assert second["ran"] == [] and sorted(second["reused"]) == sorted(first["ran"])
    assert {p: os.path.getmtime(p) for p in stamps} == stamps


def test_matched_study_report(matched):
    _, report, _, _, _ = matched
    text = report.read_text()
    assert text.startswith("# Results\n\n## Other\n\ntext\n") and text.count(sm.HEADING) == 1
    assert "| 2 | DIITO FULL | 2 | 1/1 |" in text and "| 2 | standard, time-matched steps | 3 | 1/1 |" in text
    assert (report.parent / "study_diito_matched.png").stat().st_size > 0


def test_matched_study_refuses_a_cache_of_another_size(matched, tmp_path):
    tmp, _, _, _, _ = matched
    said = []
    out = sm.main(["--smoke", "--budgets", "2", "--seeds", "0", "--ratio", "2.0", "--work", str(tmp / "w")],
                  log=said.append)
    assert out == {"error": "size mismatch"} and "another size" in said[0]
