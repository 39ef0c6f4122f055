"""Pure pieces of applications.distill against hand-computed oracles: options, masking, pairing, losses."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from applications.distill import seeding
from applications.distill.config import DistillConfig, objective_weights, student_layer_indices
from applications.distill.diito.pairing import draw_plan, source_permutation, span_length
from applications.distill.errors import DataError, DistillConfigError, IncompatibleModelsError, SpanError
from applications.distill.masking import clm_labels, mlm_mask, token_weights
from applications.distill.objectives import clm_loss, cosine_loss, kd_loss, mlm_loss, top1_agreement


# -- options ------------------------------------------------------------------------------------
def test_recipes_and_objective_specs():
    assert objective_weights(None, "diito") == {"ce": 0.25, "mlm": 0.25, "cos": 0.25, "diito": 0.25}
    assert objective_weights(None, "standard") == pytest.approx({"ce": 1 / 3, "mlm": 1 / 3, "cos": 1 / 3})
    assert objective_weights("mlm,ce") == {"mlm": 0.5, "ce": 0.5}
    assert objective_weights("ce=0.7, clm=0.3") == {"ce": 0.7, "clm": 0.3}
    with pytest.raises(DistillConfigError, match="unknown objective 'kl'"):
        objective_weights("kl,ce")
    with pytest.raises(DistillConfigError, match="not both"):
        objective_weights("mlm,clm")
    with pytest.raises(DistillConfigError, match="unknown alignment"):
        DistillConfig(alignment="diagonal")


def test_student_layers_follow_distilbert_rule():
    assert student_layer_indices(6, 12) == [0, 2, 4, 7, 9, 11]
    assert student_layer_indices(3, 12) == [0, 2, 4]
    assert student_layer_indices(3, 6) == [0, 2, 4]
    assert student_layer_indices("1,3", 4) == [1, 3]
    assert student_layer_indices(4, 4) == [0, 1, 2, 3]  # rule does not fit: spread evenly
    with pytest.raises(DistillConfigError, match=r"0\.\.3"):
        student_layer_indices([0, 4], 4)
    with pytest.raises(DistillConfigError, match="1..4"):
        student_layer_indices(5, 4)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("temperature: 3\nspan-mode: random\nrecipe: standard\n")
    cfg = DistillConfig.from_sources(str(path), temperature=4.0, seed=None)
    assert (cfg.temperature, cfg.span_mode, cfg.recipe) == (4.0, "random", "standard")
    (tmp_path / "bad.json").write_text('{"tempreature": 3}')
    with pytest.raises(DistillConfigError, match="unknown options"):
        DistillConfig.from_sources(str(tmp_path / "bad.json"))


# -- masking ------------------------------------------------------------------------------------
def test_token_weights_by_hand():
    w = token_weights(torch.tensor([0, 1, 10, 1000]), special_ids=[1], smoothing=0.7)
    assert w[0] == pytest.approx(1.0)  # unseen tokens count as 1
    assert w[1] == 0.0
    assert w[2] == pytest.approx(10 ** -0.7)
    assert w[3] == pytest.approx(1000 ** -0.7)


def _gens(n, seed=0):
    return [seeding.generator(seed, i) for i in range(n)]


def test_mask_quota_specials_and_padding():
    special = 2
    ids = torch.randint(3, 30, (50, 23), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = special
    lengths = torch.randint(5, 24, (50,), generator=torch.Generator().manual_seed(1))
    attn = (torch.arange(23)[None] < lengths[:, None]).long()
    w = token_weights(torch.ones(30), [special])
    m = mlm_mask(ids, attn, w, mask_token_id=1, vocab_size=30, generators=_gens(50))
    chosen = m.labels != -100
    for r in range(50):
        assert int(chosen[r].sum()) == math.ceil(0.15 * int(lengths[r]))
    assert not chosen[:, 0].any()  # special tokens never
    assert not (chosen & (attn == 0)).any()  # padding never
    assert torch.equal(m.labels[chosen], ids[chosen])
    assert torch.equal(m.input_ids[~chosen], ids[~chosen])


def test_mask_split_80_10_10():
    ids = torch.randint(3, 1000, (400, 40), generator=torch.Generator().manual_seed(2))
    attn = torch.ones_like(ids)
    m = mlm_mask(ids, attn, torch.ones(1000), mask_token_id=1, vocab_size=1000, generators=_gens(400, 3))
    chosen = m.labels != -100
    n = int(chosen.sum())
    assert n == 400 * 6
    masked = (m.input_ids[chosen] == 1).float().mean()
    kept = (m.input_ids[chosen] == ids[chosen]).float().mean()
    assert abs(masked - 0.8) < 0.03
    assert abs(kept - (0.1 + 0.1 / 1000)) < 0.02  # a random id equals the original with prob 1/V
    assert abs(1 - masked - kept - 0.1) < 0.02


def test_mask_favours_rare_tokens_as_count_power():
    # Two maskable tokens, one pick: P(rare) = w_rare / (w_rare + w_common), w = count^-0.7.
    counts = torch.zeros(5)
    counts[3], counts[4] = 1000, 10
    w = token_weights(counts, [0, 1, 2])
    ids = torch.tensor([[3, 4]]).expand(4000, 2).contiguous()
    m = mlm_mask(ids, torch.ones_like(ids), w, 1, 5, _gens(4000, 5), probability=0.15)
    rare_share = float((m.labels[:, 1] != -100).float().mean())
    expected = 10 ** -0.7 / (10 ** -0.7 + 1000 ** -0.7)
    assert abs(rare_share - expected) < 0.015


def test_masking_of_a_row_does_not_depend_on_its_batch():
    ids = torch.randint(3, 50, (4, 12), generator=torch.Generator().manual_seed(4))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    w = torch.ones(50)
    whole = mlm_mask(ids, attn, w, 1, 50, [seeding.generator(9, i) for i in range(4)])
    width = 8  # row 1 alone, padded to a different width
    alone = mlm_mask(ids[1:2, :width], attn[1:2, :width], w, 1, 50, [seeding.generator(9, 1)])
    assert torch.equal(alone.labels[0], whole.labels[1, :width])
    assert torch.equal(alone.input_ids[0], whole.input_ids[1, :width])


def test_clm_labels():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    attn = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert clm_labels(ids, attn).tolist() == [[5, 6, 7], [8, 9, -100]]


# -- pairing ------------------------------------------------------------------------------------
@given(st.integers(1, 12), st.integers(0, 10 ** 6))
@settings(max_examples=40, deadline=None)
def test_source_permutation_is_a_derangement(batch, seed):
    perm = source_permutation(batch, torch.Generator().manual_seed(seed))
    assert sorted(perm.tolist()) == list(range(batch))
    if batch > 1:
        assert all(perm[i] != i for i in range(batch))


@given(st.lists(st.integers(4, 20), min_size=2, max_size=6), st.sampled_from(["consecutive", "random", "masked"]),
       st.integers(0, 10 ** 6))
@settings(max_examples=60, deadline=None)
def test_span_invariants(lengths, mode, seed):
    batch, width = len(lengths), max(lengths)
    attn = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    labels = torch.full((batch, width), -100)
    g = torch.Generator().manual_seed(seed)
    for r, n in enumerate(lengths):  # at least 2 masked positions per row, inside the row
        picks = torch.randperm(n, generator=g)[: max(2, n // 3)]
        labels[r, picks] = 1
    perm = source_permutation(batch, g)
    plan = draw_plan(attn, [seeding.generator(seed, r) for r in range(batch)], perm, mode, 0.3, labels)
    for i in range(batch):
        j = int(perm[i])
        n = int(plan.valid[i].sum())
        want = int(0.3 * min(lengths[i], lengths[j]))
        if mode == "masked":
            want = min(want, int((labels[i] != -100).sum()), int((labels[j] != -100).sum()))
        assert n == want
        b, s = plan.base_pos[i, :n].tolist(), plan.source_pos[i, :n].tolist()
        assert all(0 <= p < lengths[i] for p in b) and all(0 <= p < lengths[j] for p in s)
        assert b == sorted(set(b)) and s == sorted(set(s))
        if mode == "consecutive":
            assert b == list(range(b[0], b[0] + n)) and s == list(range(s[0], s[0] + n))
        if mode == "masked":
            assert all(labels[i, p] != -100 for p in b) and all(labels[j, p] != -100 for p in s)


def test_mix_by_hand_and_each_source_value_used_once():
    attn = torch.tensor([[1] * 6, [1] * 6, [1, 1, 1, 1, 0, 0]])
    perm = torch.tensor([2, 0, 1])
    plan = draw_plan(attn, [seeding.generator(1, r) for r in range(3)], perm, "random", 0.5)
    base = torch.randn(3, 6, 4, dtype=torch.float64)
    src = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    out = plan.mix(base, src)
    want = base.clone()
    uses = torch.zeros(3, 6)
    for i in range(3):
        for k in range(int(plan.valid[i].sum())):
            b, s = int(plan.base_pos[i, k]), int(plan.source_pos[i, k])
            want[i, b] = src[int(perm[i]), s].detach()
            uses[int(perm[i]), s] += 1
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(src.grad, uses[..., None].double().expand(3, 6, 4))
    assert plan.valid.sum(1).tolist() == [2, 3, 2]  # int(0.5 * min(len_i, len_perm[i])): padded widths differ


def test_too_short_for_a_span():
    assert span_length(10, 4) == 1
    with pytest.raises(SpanError, match="too short.*at least 4 tokens"):
        span_length(10, 3)


# -- objectives ---------------------------------------------------------------------------------
def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_by_hand():
    t_logits, s_logits, T = [0.0, 2.0, -1.0], [1.0, 0.0, 0.5], 2.0
    p, q = _softmax([x / T for x in t_logits]), _softmax([x / T for x in s_logits])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    teacher = torch.tensor([[t_logits, [9.0, -9.0, 0.0]]])
    student = torch.tensor([[s_logits, [-9.0, 9.0, 0.0]]])
    got = kd_loss(student, teacher, torch.tensor([[1, 0]]), T)
    assert float(got) == pytest.approx(kl * T * T, rel=1e-6)
    both = kd_loss(student, teacher, torch.tensor([[1, 1]]), T)
    p2, q2 = _softmax([4.5, -4.5, 0]), _softmax([-4.5, 4.5, 0])
    kl2 = sum(pi * math.log(pi / qi) for pi, qi in zip(p2, q2))
    assert float(both) == pytest.approx((kl + kl2) / 2 * T * T, rel=1e-5)


def test_lm_losses_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    ce = lambda row, k: -math.log(_softmax(row)[k])
    labels = torch.tensor([[-100, 1, -100]])
    assert float(mlm_loss(logits, labels)) == pytest.approx(ce([0, 1, 0], 1), rel=1e-6)
    labels = torch.tensor([[0, 2, -100]])  # position 0 predicts label 2; position 1 predicts -100 (ignored)
    assert float(clm_loss(logits, labels)) == pytest.approx(ce([2, 0, 0], 2), rel=1e-6)


def test_cosine_loss_and_agreement_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]])
    assert float(cosine_loss(s, t, torch.tensor([[1, 1, 0]]))) == pytest.approx(0.5)
    assert top1_agreement(s, t, torch.tensor([[1, 1, 1]])) == (1, 3)


def test_loss_shape_errors_name_the_sizes():
    with pytest.raises(IncompatibleModelsError, match="student vocabulary size 5 != teacher vocabulary size 7"):
        kd_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 7), torch.ones(1, 2))
    with pytest.raises(IncompatibleModelsError, match="student's hidden size|student 4, teacher 8"):
        cosine_loss(torch.zeros(1, 2, 4), torch.zeros(1, 2, 8), torch.ones(1, 2))


# -- data ---------------------------------------------------------------------------------------
def test_read_text_jsonl_and_saved_dataset(tmp_path):
    import datasets

    from applications.distill.data import read_texts

    (tmp_path / "a.txt").write_text("one line\n\n  two  \n")
    assert read_texts(str(tmp_path / "a.txt")) == ["one line", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "x y"}\n\n{"text": "z"}\n')
    assert read_texts(str(tmp_path / "b.jsonl")) == ["x y", "z"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["p q", "", "r"]})}).save_to_disk(
        str(tmp_path / "ds"))
    assert read_texts(str(tmp_path / "ds"), text_column="body") == ["p q", "r"]
    with pytest.raises(DataError, match="no column 'text'"):
        read_texts(str(tmp_path / "ds"))


def test_demo_corpus_is_deterministic_and_agrees_in_number():
    import re

    from applications.distill.corpus import ADJS, NOUNS, VERBS_I, VERBS_T, make_corpus

    a, b = make_corpus(300, seed=1), make_corpus(300, seed=1)
    assert a == b and a != make_corpus(300, seed=2)
    singular_verbs, plural_verbs = set(VERBS_T) | set(VERBS_I), set(VERBS_T.values()) | set(VERBS_I.values())
    adj = "|".join(ADJS)
    simple = re.compile(rf"^(the|a|this|that|every|some|these|those|many|two) (?:(?:{adj}) )?(\w+) (\w+)")
    checked = 0
    for sentence in a:
        m = simple.match(sentence)
        if m is None or m.group(3) not in singular_verbs | plural_verbs:
            continue  # subject followed by a prepositional phrase or relative clause
        noun, verb = m.group(2), m.group(3)
        assert (noun in NOUNS) == (verb in singular_verbs), sentence
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_tokenized_texts_in_chunks_equal_each_text_tokenized_alone(monkeypatch, chunk):
    """Chunked tokenization (data.TOKENIZE_CHUNK) keeps, drops and counts exactly as tokenizing each text alone."""
    from applications.distill import data
    from applications.distill.corpus import make_corpus

    texts = make_corpus(40, seed=3)
    tok = data.train_tokenizer(texts, 120, causal=False)
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", chunk)
    got = data.TokenizedTexts(texts, tok, max_length=30, min_length=15)
    alone = [tok(t, truncation=True, max_length=30)["input_ids"] for t in texts]
    assert got.examples == [ids for ids in alone if len(ids) >= 15]
    assert got.dropped == sum(len(ids) < 15 for ids in alone) > 0
    assert got.truncated == sum(len(tok(t)["input_ids"]) > 30 for t in texts) > 0
