"""Study (a): held-out perplexity of a GPT-style student distilled with plain KD vs ATKD, 3 seeds.

Data: ../shared/data/wikitext-2 (test.txt to train on, valid.txt held out; see its README); the
study exits with a clear message when it is absent. A word-level tokenizer (`tokenizers` WordLevel,
the most frequent words, WikiText's own `<unk>` for the rest) is trained on the training split.
One teacher (GPT-2 architecture, 4 layers, width 128) is trained with the causal-LM loss; then, per
seed, two students (2 layers, width 128, the same seeded random init) are distilled from it for the
same steps on the same batches: KD = forward KL(teacher ‖ student) per token (τ = 1, mean over
tokens), ATKD = `atkd_objective` wrapping forward KL (λ = 0.2, 50% hard tokens). Neither adds the
ground-truth CLM loss, so the comparison is of the distillation objectives alone.

    python benchmarks/study_atkd.py                 # the study (~12 min on a shared 2-core CPU, 1 thread)
    python benchmarks/study_atkd.py --quick         # a smoke run (seconds)
    python benchmarks/study_atkd.py --with-clm      # both methods also get the CLM loss (weights 0.5 / 0.5)
Last line: one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf

from applications.distill.objectives.atkd import ATKDConfig, atkd_objective

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"


def tokenizer_for(lines: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=vocab_size,
                                                            special_tokens=["<pad>", "<eos>", "<unk>"]))
    return tok


def blocks(tok, lines: list[str], length: int) -> torch.Tensor:
    """The text as one token stream (a <eos> after each line), cut into [n, length] blocks."""
    eos = tok.token_to_id("<eos>")
    ids = []
    for line in lines:
        if line.strip():
            ids.extend(tok.encode(line.strip()).ids + [eos])
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def gpt(vocab: int, layers: int, width: int, length: int, seed: int):
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=width, n_layer=layers, n_head=4,
                        n_inner=4 * width, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                        bos_token_id=1, eos_token_id=1, use_cache=False)
    return tf.GPT2LMHeadModel(cfg)


def schedule(opt, steps: int):
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))


def order(n: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """The same seeded sequence of batch indices for every method of a seed."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.randperm(n, generator=g) for _ in range(steps * batch // n + 1)])
    return [idx[i * batch:(i + 1) * batch] for i in range(steps)]


def clm(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def perplexity(model, data: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(data), batch):
        ids = data[i:i + batch]
        total += float(clm(model(input_ids=ids).logits, ids)) * ids.shape[0]
    return math.exp(total / len(data))


def train(model, data, steps, batch, lr, seed, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = schedule(opt, steps)
    model.train()
    for ids in (data[i] for i in order(len(data), steps, batch, seed)):
        loss = loss_fn(model, ids)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return float(loss.detach())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--vocab", type=int, default=3000)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--eval-blocks", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--with-clm", action="store_true",
                    help="add the ground-truth CLM loss to both (0.5 * clm + 0.5 * distillation loss)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="outputs/study_atkd.json")
    a = ap.parse_args(argv)
    data = Path(a.data)
    if not (data / "test.txt").is_file() or not (data / "valid.txt").is_file():
        print(f"skipped: WikiText-2 not found at {data} (needs test.txt and valid.txt; see ../shared/data/README.md)")
        return {"skipped": True}
    if a.quick:
        a.seeds, a.teacher_steps, a.student_steps, a.eval_blocks, a.vocab = [0], 20, 10, 20, 2000
    torch.set_num_threads(a.threads)
    start = time.time()
    train_lines = (data / "test.txt").read_text(encoding="utf-8").splitlines()
    valid_lines = (data / "valid.txt").read_text(encoding="utf-8").splitlines()
    tok = tokenizer_for(train_lines, a.vocab)
    vocab = max(tok.get_vocab().values()) + 1  # ids can skip one when a special token is also a word
    train_ids = blocks(tok, train_lines, a.length)
    valid_ids = blocks(tok, valid_lines, a.length)[: a.eval_blocks]
    print(f"vocab {vocab}, train blocks {tuple(train_ids.shape)}, eval blocks {tuple(valid_ids.shape)}", flush=True)

    teacher = gpt(vocab, 4, 128, a.length, seed=1234)
    train(teacher, train_ids, a.teacher_steps, a.batch, 2e-3, 1234, lambda m, ids: clm(m(input_ids=ids).logits, ids))
    teacher.eval().requires_grad_(False)
    result = {"teacher_ppl": perplexity(teacher, valid_ids), "runs": {"kd": {}, "atkd": {}}}
    print(f"teacher ppl {result['teacher_ppl']:.2f} ({time.time() - start:.0f}s)", flush=True)

    def kd_term(s_logits, t_logits, ids):
        s, t = F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1)
        return (t.exp() * (t - s)).sum(-1).mean()

    def atkd_term(s_logits, t_logits, ids):
        return atkd_objective(s_logits, t_logits, ids, causal=True, config=ATKDConfig())[0]

    def objective(term):
        def loss(m, ids):
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
            s_logits = m(input_ids=ids).logits
            value = term(s_logits, t_logits, ids)
            return 0.5 * clm(s_logits, ids) + 0.5 * value if a.with_clm else value
        return loss

    kd, atkd = objective(kd_term), objective(atkd_term)

    for seed in a.seeds:
        for name, fn in (("kd", kd), ("atkd", atkd)):
            student = gpt(vocab, 2, 128, a.length, seed=seed)
            train(student, train_ids, a.student_steps, a.batch, 2e-3, seed, fn)
            ppl = perplexity(student, valid_ids)
            result["runs"][name][seed] = ppl
            print(f"seed {seed} {name}: ppl {ppl:.2f} ({time.time() - start:.0f}s)", flush=True)
    for name, runs in result["runs"].items():
        vals = list(runs.values())
        result[name] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    result.update(settings={k: v for k, v in vars(a).items() if k != "out"}, vocab=vocab,
                  seconds=round(time.time() - start))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
