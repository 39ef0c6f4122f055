"""The fast DIITO step (cached standard pass, replayed lower blocks) against naive interchanges computed
with the public `interchange`; students built from teachers; alignment checks."""

import contextlib

import pytest
import torch
import transformers as tf

from applications.distill import seeding
from applications.distill.diito.pairing import draw_plan, source_permutation
from applications.distill.diito.step import Objectives, aligned_pairs, distill_losses
from applications.distill.errors import IncompatibleModelsError
from applications.distill.student import build_student, check_compatible
from interventions import Alignment, AlignmentError, Site, get_value, interchange, set_value

V = 30
CONFIGS = {
    "bert": lambda: tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0),
    "roberta": lambda: tf.RobertaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                        intermediate_size=24, max_position_embeddings=40, pad_token_id=1),
    "distilbert": lambda: tf.DistilBertConfig(vocab_size=V, dim=16, n_layers=4, n_heads=2, hidden_dim=24,
                                              max_position_embeddings=32, dropout=0.0, attention_dropout=0.0),
    "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=16, n_layer=4, n_head=2, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": lambda: tf.LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                    num_key_value_heads=1, intermediate_size=24, max_position_embeddings=32),
    "qwen2": lambda: tf.Qwen2Config(vocab_size=V, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                    num_key_value_heads=1, intermediate_size=24, max_position_embeddings=32),
}
CAUSAL = {"gpt2", "llama", "qwen2"}


def teacher_of(family):
    torch.manual_seed(0)
    auto = tf.AutoModelForCausalLM if family in CAUSAL else tf.AutoModelForMaskedLM
    return auto.from_config(CONFIGS[family]()).double().eval()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_student_copies_chosen_teacher_layers(family):
    teacher = teacher_of(family)
    full = build_student(teacher, [0, 1, 2, 3])  # all layers: the student is the teacher
    x = torch.randint(3, V, (2, 7))
    torch.testing.assert_close(full(x).logits, teacher(x).logits, rtol=0, atol=0)
    small = build_student(teacher, [1, 3])
    t_state, s_state = teacher.state_dict(), small.state_dict()
    moved = [k for k in s_state if ".1." in k and ("layer" in k or ".h." in k)]
    assert moved
    for key in moved:  # student block 1 is teacher block 3
        torch.testing.assert_close(s_state[key], t_state[key.replace(".1.", ".3.", 1)], rtol=0, atol=0)
    emb = small.get_input_embeddings().weight
    torch.testing.assert_close(emb, teacher.get_input_embeddings().weight, rtol=0, atol=0)
    assert small.config.num_hidden_layers == 2


def test_compatibility_errors_name_the_sizes():
    teacher = teacher_of("bert")
    other = tf.BertForMaskedLM(tf.BertConfig(vocab_size=V + 3, hidden_size=8, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=8))
    with pytest.raises(IncompatibleModelsError, match=f"student {V + 3}, teacher {V}"):
        check_compatible(other, teacher)
    narrow = tf.BertForMaskedLM(tf.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=8))
    with pytest.raises(IncompatibleModelsError, match="hidden size is 8 and the teacher's 16.*--cos-projection"):
        check_compatible(narrow, teacher, need_hidden=True)
    check_compatible(narrow, teacher, need_hidden=True, projection=True)  # a projection makes it valid


def test_aligned_pairs_and_range_errors():
    assert aligned_pairs("full", 2, 4) == [(0, (0, 1)), (1, (2, 3))]
    assert aligned_pairs("middle", 6, 12) == [(3, (6,))]
    assert aligned_pairs("late", 3, 12) == [(0, (9,)), (1, (10,))]
    with pytest.raises(AlignmentError, match=r"teacher layer 7 .* out of range.*0\.\.3"):
        aligned_pairs(Alignment({"layers.0.output": ["layers.7.output"]}), 2, 4)
    with pytest.raises(AlignmentError, match=r"student layer 5"):
        aligned_pairs(Alignment({"layers.5.output": ["layers.0.output"]}), 2, 4)
    with pytest.raises(AlignmentError, match="whole block outputs"):
        aligned_pairs(Alignment({"layers.0.mlp_output": ["layers.0.output"]}), 2, 4)


@contextlib.contextmanager
def _last_block_output(model, family):
    """Captures the last block's output as it enters the MLM head (BERT) or the final norm (GPT-2)."""
    reader = model.cls if family == "bert" else model.transformer.ln_f
    seen = []
    handle = reader.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def _kl_t2(s_logits, t_logits, T):
    p = torch.softmax(t_logits / T, -1)
    return (p * (p.log() - torch.log_softmax(s_logits / T, -1))).sum(-1).mean() * T * T


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_diito_equals_naive_public_interchange(family):
    teacher = teacher_of(family)
    student = build_student(teacher, 2)
    causal = family in CAUSAL
    B, S = 3, 10
    ids = torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = ids.clone() if causal else torch.where(torch.rand(B, S) < 0.3, ids, torch.full_like(ids, -100))
    perm = source_permutation(B, torch.Generator().manual_seed(2))
    plan = draw_plan(inputs["attention_mask"], [seeding.generator(3, i) for i in range(B)], perm)
    objectives = Objectives({"diito": 1.0, "diito_cos": 1.0}, causal=causal, temperature=2.0)
    source = {k: v[perm] for k, v in inputs.items()}
    for pair in aligned_pairs("full", 2, 4):
        s_layer, t_layers = pair
        student.zero_grad()
        fast = distill_losses(student, teacher, inputs, labels, objectives, plan, pair)
        fast["diito"].backward()
        fast_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

        student.zero_grad()
        site = lambda j, pos: Site(f"layers.{j}.output", positions=pos)
        with torch.no_grad(), _last_block_output(teacher, family) as t_last:
            t_cf = interchange(teacher, inputs, source, [site(j, plan.base_pos) for j in t_layers],
                               source_sites=[site(j, plan.source_pos) for j in t_layers]).logits
        with _last_block_output(student, family) as s_last:
            s_cf = interchange(student, inputs, source, [site(s_layer, plan.base_pos)],
                               source_sites=[site(s_layer, plan.source_pos)]).logits
        naive = _kl_t2(s_cf, t_cf, 2.0)
        naive.backward()
        torch.testing.assert_close(fast["diito"], naive, rtol=1e-9, atol=1e-12)
        for name, g in fast_grads.items():
            torch.testing.assert_close(g, dict(student.named_parameters())[name].grad, rtol=1e-7, atol=1e-10)
        # diito_cos is 1 - cos between the two models' *counterfactual* last block outputs (read here as the
        # input of the head / final norm, outside the core's hooks). Fails if it compared the standard pass's
        # states, the pre-swap states, or another layer's (the old `>= 0` held for any of those).
        mask = inputs["attention_mask"].bool()
        want = (1 - torch.nn.functional.cosine_similarity(s_last[0], t_last[0], dim=-1))[mask].mean()
        torch.testing.assert_close(fast["diito_cos"].detach(), want.detach(), rtol=1e-9, atol=1e-12)
        standard = (1 - torch.nn.functional.cosine_similarity(
            get_value(student, inputs, "layers.1.output")["layers.1.output"],
            get_value(teacher, inputs, "layers.3.output")["layers.3.output"], dim=-1))[mask].mean()
        assert not torch.allclose(want.detach(), standard.detach())  # the swap does change what is compared


def test_padded_batches_match_a_three_pass_reference():
    """Variable span lengths and padding: the fast path equals full source and counterfactual forwards."""
    teacher = teacher_of("bert")
    student = build_student(teacher, 2)
    ids = torch.randint(3, V, (4, 12), generator=torch.Generator().manual_seed(5))
    attn = (torch.arange(12)[None] < torch.tensor([[12], [7], [10], [5]])).long()
    inputs = {"input_ids": ids * attn, "attention_mask": attn}
    perm = source_permutation(4, torch.Generator().manual_seed(6))
    plan = draw_plan(attn, [seeding.generator(7, i) for i in range(4)], perm, "random")
    assert len(set(plan.valid.sum(1).tolist())) > 1
    objectives = Objectives({"diito": 1.0}, causal=False)
    pair = (1, (2, 3))
    fast = distill_losses(student, teacher, inputs, torch.full_like(ids, -100), objectives, plan, pair)["diito"]
    unperm = torch.argsort(perm)

    def reference(model, layers):
        src = get_value(model, {k: v[perm] for k, v in inputs.items()}, [f"layers.{j}.output" for j in layers])
        mixes = {f"layers.{j}.output": (lambda cur, j=j: plan.mix(cur, src[f"layers.{j}.output"][unperm]))
                 for j in layers}
        with set_value(model, mixes):
            return model(**inputs).logits

    mask = attn.bool()
    p = torch.softmax(reference(teacher, [2, 3]) / 2, -1)[mask]
    want = (p * (p.log() - torch.log_softmax(reference(student, [1]) / 2, -1)[mask])).sum(-1).mean() * 4
    torch.testing.assert_close(fast, want, rtol=1e-9, atol=1e-12)


def test_standard_losses_and_ce_scope_by_hand():
    teacher = teacher_of("bert")
    student = build_student(teacher, 2)
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(9))
    attn = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 4] = ids[0, 2], ids[1, 4]
    inputs = {"input_ids": ids, "attention_mask": attn}
    with torch.no_grad():
        t, s = teacher(**inputs).logits, student(**inputs).logits
        t_h = get_value(teacher, inputs, "layers.3.output")["layers.3.output"]
        s_h = get_value(student, inputs, "layers.1.output")["layers.1.output"]
    for scope, where in (("all", attn.bool()), ("masked", labels != -100)):
        got = distill_losses(student, teacher, inputs, labels, Objectives({"ce": 1.0, "cos": 1.0, "mlm": 1.0},
                                                                          ce_scope=scope))
        p = torch.softmax(t[where] / 2, -1)
        want_ce = (p * (p.log() - torch.log_softmax(s[where] / 2, -1))).sum(-1).mean() * 4
        torch.testing.assert_close(got["ce"].detach(), want_ce, rtol=1e-9, atol=1e-12)
    m = attn.bool()
    want_cos = (1 - torch.nn.functional.cosine_similarity(s_h[m], t_h[m], dim=-1)).mean()
    torch.testing.assert_close(got["cos"].detach(), want_cos, rtol=1e-9, atol=1e-12)
    want_mlm = -torch.log_softmax(s, -1)[labels != -100].gather(1, ids[labels != -100][:, None]).mean()
    torch.testing.assert_close(got["mlm"].detach(), want_mlm, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["loss"].detach(), (got["ce"] + got["cos"] + got["mlm"]).detach())
