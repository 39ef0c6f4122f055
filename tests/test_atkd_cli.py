"""ATKD as a training objective: step-level value against a token-by-token oracle, the CLI end to end, bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as tf

from applications.distill.cli import main
from applications.distill.config import objective_weights
from applications.distill.corpus import make_corpus
from applications.distill.data import train_tokenizer
from applications.distill.diito.step import Objectives, distill_losses
from applications.distill.objectives.atkd import ATKDConfig, atkd_objective, unsupported_kd
from interventions import InterventionError


def oracle_atkd(t_logits, s_logits, targets, valid, lam, fraction, reverse=False):
    """ATKD by explicit per-token loops in float64 (target column deleted by hand)."""
    rows = []
    for b in range(targets.shape[0]):
        for i in range(targets.shape[1]):
            if not valid[b, i]:
                continue
            g = int(targets[b, i])
            p = torch.softmax(t_logits[b, i].double(), -1)
            q = torch.softmax(s_logits[b, i].double(), -1)
            unc = 1 - p[g]
            x, y = (q, p) if reverse else (p, q)
            xr, yr = torch.cat([x[:g], x[g + 1:]]), torch.cat([y[:g], y[g + 1:]])
            bx, by = torch.stack([x[g], xr.sum()]), torch.stack([y[g], yr.sum()])
            tkd = float((bx * (bx / by).log()).sum())
            xh, yh = xr / xr.sum(), yr / yr.sum()
            dkd = float((xh * (xh / yh).log()).sum())
            rows.append((float(unc), tkd, dkd))
    k = -(-len(rows) * fraction // 1)  # ceil
    order = sorted(range(len(rows)), key=lambda j: -rows[j][0])
    hard = set(order[: int(k)])
    easy = [rows[j][2] for j in range(len(rows)) if j not in hard]
    hard_v = [rows[j][1] + rows[j][2] for j in hard]
    return lam * sum(easy) / max(len(easy), 1) + (1 - lam) * sum(hard_v) / len(hard_v)


def _gpt(layers, seed):
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=30, n_embd=16, n_layer=layers, n_head=2, n_positions=16,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


@pytest.mark.parametrize("name, reverse", [("atkd", False), ("atkd_reverse", True)])
def test_step_atkd_matches_a_token_by_token_oracle(name, reverse):
    teacher, student = _gpt(2, 0), _gpt(1, 1)
    ids = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    labels = ids.masked_fill(mask == 0, -100)
    objectives = Objectives({"clm": 0.5, name: 0.5}, causal=True, atkd_lambda=0.3, atkd_hard_fraction=0.25)
    losses = distill_losses(student, teacher, {"input_ids": ids, "attention_mask": mask}, labels, objectives)
    with torch.no_grad():
        t, s = teacher(input_ids=ids, attention_mask=mask).logits, student(input_ids=ids, attention_mask=mask).logits
    # causal: position i is scored on the next token; the last position and padding have no target
    want = oracle_atkd(t[:, :-1], s[:, :-1], labels[:, 1:], labels[:, 1:] != -100, 0.3, 0.25, reverse)
    assert abs(float(losses[name].detach()) - want) < 1e-5
    clm = torch.nn.functional.cross_entropy(s[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert abs(float(losses["loss"].detach()) - (0.5 * float(clm) + 0.5 * want)) < 1e-5


def test_masked_lm_counts_the_labelled_positions_only():
    g = torch.Generator().manual_seed(4)
    t, s = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    labels = torch.full((2, 6), -100)
    labels[0, 1], labels[0, 4], labels[1, 0], labels[1, 2], labels[1, 5] = 3, 8, 0, 5, 2  # the masked positions
    got, stats = atkd_objective(s, t, labels, causal=False, config=ATKDConfig(lam=0.2, hard_fraction=0.5))
    assert abs(float(got) - oracle_atkd(t, s, labels, labels != -100, 0.2, 0.5)) < 1e-5
    assert abs(stats["atkd_hard_share"] - 3 / 5) < 1e-6  # ceil(0.5 * 5) hard tokens of 5


def test_objective_names_and_other_kd_losses():
    assert objective_weights("clm,atkd") == {"clm": 0.5, "atkd": 0.5}
    assert objective_weights("mlm=0.3,atkd_reverse=0.7") == {"mlm": 0.3, "atkd_reverse": 0.7}
    with pytest.raises(InterventionError, match="unknown objective 'atkd_tvd'; valid objectives: .*atkd_reverse"):
        objective_weights("clm,atkd_tvd")
    with pytest.raises(InterventionError, match="total variation has no exact decomposition"):
        unsupported_kd("tvd")
    with pytest.raises(InterventionError, match="two different uncertainty weights"):
        unsupported_kd("gjsd")
    with pytest.raises(InterventionError, match="chain rule .* not implemented"):
        unsupported_kd("skew_kl")


@pytest.fixture(scope="module")
def causal_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("atkd_cli")
    texts = make_corpus(40, seed=5)
    (root / "train.txt").write_text("\n".join(texts) + "\n")
    tok = train_tokenizer(texts, 300, causal=True)
    torch.manual_seed(0)
    teacher = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return root


def _train(root, out, *extra):
    return main(["train", "--teacher", str(root / "teacher"), "--train-file", str(root / "train.txt"),
                 "--output-dir", str(out), "--student-layers", "1", "--max-steps", "2", "--batch-size", "4",
                 "--save-steps", "10", "--logging-steps", "1", "--max-length", "32", "--no-progress", "--no-plot",
                 *extra])


def test_cli_trains_with_atkd(causal_setup, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _train(causal_setup, out, "--objectives", "clm,atkd", "--atkd-lambda", "0.3", "--atkd-hard-fraction", "0.4")
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["global_step"] == 2 and summary["objectives"] == {"clm": 0.5, "atkd": 0.5}
    saved = json.loads((out / "distill_config.json").read_text())
    assert saved["atkd_lambda"] == 0.3 and saved["atkd_hard_fraction"] == 0.4
    keys = {line.split(",")[1] for line in (out / "log.csv").read_text().splitlines()[1:]}
    assert {"loss_clm", "loss_atkd"} <= keys
    assert tf.AutoModelForCausalLM.from_pretrained(out).config.n_layer == 1


def test_cli_atkd_reverse_on_a_masked_lm(tmp_path, capsys):
    texts = make_corpus(40, seed=6)
    (tmp_path / "train.txt").write_text("\n".join(texts) + "\n")
    tok = train_tokenizer(texts, 120, causal=False)
    torch.manual_seed(0)
    teacher = tf.BertForMaskedLM(tf.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=24, max_position_embeddings=64,
                                               pad_token_id=tok.pad_token_id))
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    rc = _train(tmp_path, tmp_path / "run", "--objectives", "mlm,atkd_reverse")
    assert rc == 0, capsys.readouterr().err
    keys = {line.split(",")[1] for line in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]}
    assert "loss_atkd_reverse" in keys


@pytest.mark.parametrize("flags, message", [
    (["--atkd-hard-fraction", "1.0"], r"hard fraction must be in \(0, 1\), got 1.0"),
    (["--atkd-lambda", "1.5"], r"lambda must be in \[0, 1\], got 1.5"),
    (["--objectives", "clm,atkd_tvd"], "unknown objective 'atkd_tvd'"),
])
def test_cli_bad_atkd_options(causal_setup, tmp_path, capsys, flags, message):
    args = flags if "--objectives" in flags else ["--objectives", "clm,atkd", *flags]
    rc = _train(causal_setup, tmp_path / "bad", *args)
    assert rc == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()  # refused before anything was written
