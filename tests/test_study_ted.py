"""The TED study pipeline at toy size: runs end to end, caches every finished piece, resumes, reports."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_study_twice

from benchmarks import study_ted as st

SMOKE = ["--smoke", "--seeds", "0", "--threads", "1"]
RUNS = [f"{s}-{m}-s0" for s in st.SETTINGS for m in st.METHODS]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """One smoke study, then a second invocation of the same command on the same cache."""
    tmp = tmp_path_factory.mktemp("study")
    report = tmp / "docs" / "results.md"
    report.parent.mkdir()
    report.write_text(f"# Results\n\n## Someone else's study\n\nTheir text.\n\n{st.HEADING}\n\nmy reading\n")
    argv = SMOKE + ["--work", str(tmp / "work"), "--report", str(report)]
    first, second, stamps = run_study_twice(st.main, argv, tmp / "work")
    return tmp, report, first, second, stamps


def test_first_invocation_runs_every_piece(two_runs):
    tmp, _, first, _, _ = two_runs
    assert sorted(first["ran"]) == sorted(RUNS) and first["reused"] == [] and first["busy"] == []
    for setting in st.SETTINGS:
        for method in st.METHODS:
            r = first["rows"][setting][method][0]
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["init_accuracy"] <= 1.0
        ted = first["rows"][setting]["ted"][0]
        assert ted["filter_layers"] == [0, 1] and all(0.0 <= a <= 1.0 for a in ted["filter_accuracy"])
    assert first["teacher_filters"]["layers"] == [1, 3]
    assert first["teacher"]["mlm"]["perplexity"] > 1.0 and first["student_mlm"][0]["perplexity"] > 1.0
    # one pre-training per seed for the pre-trained student, one for the teacher
    assert (tmp / "work" / "student_mlm" / "s0" / "result.json").is_file()
    assert (tmp / "work" / "teacher_mlm" / "result.json").is_file()


def test_second_invocation_reuses_every_piece(two_runs):
    _, _, first, second, stamps = two_runs
    assert second["ran"] == [] and sorted(second["reused"]) == sorted(RUNS)
    assert second["rows"] == first["rows"]
    assert {p: os.path.getmtime(p) for p in stamps} == stamps  # nothing recomputed or rewritten


def test_report_section_written_and_others_kept(two_runs):
    _, report, _, _, _ = two_runs
    text = report.read_text()
    assert text.startswith("# Results\n\n## Someone else's study\n\nTheir text.\n")
    assert text.count(st.HEADING) == 1 and text.rstrip().endswith("my reading")
    for setting in st.SETTINGS:
        assert f"| {st.short(setting, st.SMOKE)} | TED |" in text
    assert "TED − KD" in text and "Stage-1 filter accuracy" in text and "Stage-1 loss" in text
    assert "majority class scores" in text and "| teacher, fine-tuned | 3 |" in text
    assert f"| {st.short('random', st.SMOKE)} student at its init | 1 |" in text
    assert "**Partial study.**" not in text
    assert (report.parent / "study_ted.png").stat().st_size > 0


def test_students_of_a_seed_start_equal_across_methods(two_runs):
    """Pairing: the same seed gives the same student weights (and head) for KD, LWD and TED."""
    tmp, _, _, _, _ = two_runs
    ctx = st.Context(tmp / "work", st.SMOKE)
    for setting in st.SETTINGS:
        a, b = (st.student_init(ctx, setting, 0, lambda *_: None).state_dict() for _ in range(2))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        other = st.student_init(ctx, "random", 1, lambda *_: None).state_dict() if setting == "random" else None
        if other is not None:
            assert not torch.equal(a["classifier.weight"], other["classifier.weight"])


def test_from_teacher_student_carries_the_teachers_blocks_0_and_2(two_runs):
    import transformers as tf

    tmp, _, _, _, _ = two_runs
    ctx = st.Context(tmp / "work", st.SMOKE)
    student = st.student_init(ctx, "from_teacher", 0, lambda *_: None)
    mlm = tf.BertForMaskedLM.from_pretrained(str(tmp / "work" / "teacher_mlm" / "model"))
    for i, j in ((0, 0), (1, 2)):
        s = student.bert.encoder.layer[i].state_dict()
        t = mlm.bert.encoder.layer[j].state_dict()
        assert all(torch.equal(s[k], t[k]) for k in s)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight)


def test_filter_accuracy_counts_each_filters_head():
    """filter_accuracy against a hand count: heads that always say 1 score the share of label-1 examples."""
    import transformers as tf

    from applications.distill.objectives.ted import TEDFilters
    from applications.distill.ted.stages import TaskData

    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(st.bert_config(30, 2, 16, 2, 16))
    data = TaskData([[2, 5, 6, 3], [2, 7, 3], [2, 8, 9, 10, 3]], [1, 0, 1], 0, "classification")
    filters = TEDFilters([0, 1], 16, 8, "linear", "classification", 2)
    with torch.no_grad():
        for head in filters.heads:
            head.out.weight.zero_()
            head.out.bias.copy_(torch.tensor([0.0, 1.0]))  # always class 1
    assert st.filter_accuracy(model, filters, data, batch_size=2) == [2 / 3, 2 / 3]


def test_linear_probe_finds_a_linear_rule_and_not_noise():
    """The probe against known answers: a label that is the sign of feature 3 is found; pure noise is not."""
    g = torch.Generator().manual_seed(0)
    x, xd = torch.randn(400, 8, generator=g), torch.randn(200, 8, generator=g)
    y, yd = (x[:, 3] > 0).long(), (xd[:, 3] > 0).long()
    assert st.linear_probe(x, y, xd, yd) > 0.95
    assert st.linear_probe(x, torch.randint(0, 2, (400,), generator=g), xd, yd) < 0.7


def test_majority_share_counts_the_dev_labels(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sst_dev.tsv").write_text("sentence\tlabel\na\t1\nb\t0\nc\t1\nd\t1\n")
    assert st.majority_share(tmp_path) == 0.75


def test_missing_data_skips_with_a_message(tmp_path):
    said = []
    out = st.main(["--data", str(tmp_path / "absent"), "--work", str(tmp_path / "w")], log=said.append)
    assert out["skipped"] is True and said[0].startswith("skipped:") and "sst-2" in said[0]
    assert not (tmp_path / "w").exists()
