"""Offline teacher logits: run a causal teacher once over the corpus, store per token its top-k logits
and indices, the full log-sum-exp and the gold (next) token's logit in safetensors shards, and train
students from them without the teacher (KD by top-k renormalisation, ATKD; objectives/topk.py).

`write_teacher_logits` (the `teacher-logits` command) writes the shards and `MANIFEST` (a JSON file
with the tokenizer's and the corpus' SHA-256, the max length and tokenization settings, k, the
vocabulary). `OfflineTeacherLogits` reads them as a dataset aligned with the tokenized corpus;
`check_offline` refuses, before any weights load, what cannot train from logits alone;
`OfflineDistillation` is the trainer's method. Only causal LMs: a masked-LM teacher's logits depend on
the masks, which are drawn afresh at every step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .data import Collator, TokenizedTexts, read_texts
from .errors import DataError, DistillConfigError
from .objectives.atkd import ATKDConfig
from .objectives.kd import clm_loss
from .objectives.topk import topk_atkd_objective, topk_kd_loss
from .trainer import Method

MANIFEST = "teacher_logits.json"
SHARD = "teacher-logits-{:05d}.safetensors"
FORMAT = 1
#: Objectives that train from stored logits; every other one needs the teacher live.
OFFLINE_OBJECTIVES = ("clm", "ce", "atkd")
WHY_NOT = {
    "cos": "needs the teacher's hidden states",
    "diito": "needs a live teacher forward with interchanged spans", "diito_cos": "needs a live teacher forward "
    "with interchanged spans", "mlm": "is a masked-LM objective (masked-LM teachers are refused offline: masks "
    "are drawn per step)", "atkd_reverse": "reverse KL needs the teacher's probability of every token",
}


def sha256_texts(texts: list[str]) -> str:
    """SHA-256 of the corpus as read (its non-empty stripped examples, one per line)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def sha256_tokenizer(tokenizer) -> str:
    """SHA-256 of the tokenizer's token -> id mapping and special tokens (what the stored ids refer to)."""
    state = {"vocab": sorted(tokenizer.get_vocab().items()), "special": sorted(map(str, tokenizer.all_special_tokens)),
             "pad": tokenizer.pad_token_id, "class": type(tokenizer).__name__.removesuffix("Fast")}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What the shards hold and what they were made from (checked before a student trains on them)."""

    teacher: str
    top_k: int
    vocab_size: int
    max_length: int
    add_special_tokens: bool
    min_length: int
    text_column: str
    tokenizer_sha256: str
    corpus_sha256: str
    num_examples: int
    num_tokens: int
    shards: tuple  # (file, first example, number of examples) per shard
    format: int = FORMAT

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise DistillConfigError(f"--teacher-logits {str(directory)!r} holds no {MANIFEST}: write one with "
                                     "`python -m applications.distill teacher-logits`")
        try:
            raw = json.loads(path.read_text())
            raw["shards"] = tuple(tuple(s) for s in raw["shards"])
            manifest = cls(**raw)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DistillConfigError(f"cannot read {path}: {e}") from e
        if manifest.format != FORMAT:
            raise DistillConfigError(f"{path}: format {manifest.format}, this version reads format {FORMAT}")
        return manifest

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2))

    def check(self, tokenizer, texts: list[str], max_length: int, text_column: str, source: str) -> None:
        """Refuse a tokenizer, corpus or tokenization other than the one the logits were written from."""
        if sha256_tokenizer(tokenizer) != self.tokenizer_sha256:
            raise DistillConfigError("the run's tokenizer is not the one the teacher logits were written with "
                                     "(tokenizer hash differs): the stored token ids would mean other tokens. Use "
                                     f"the tokenizer of {self.teacher!r}, or write the logits again.")
        if sha256_texts(texts) != self.corpus_sha256:
            raise DistillConfigError(f"--train-file {source!r} is not the corpus the teacher logits were written "
                                     "from (corpus hash differs); train on that corpus or write the logits again")
        if (max_length, text_column) != (self.max_length, self.text_column):
            raise DistillConfigError(
                f"the teacher logits were written with max_length {self.max_length}, text column "
                f"{self.text_column!r}; this run has {max_length}, {text_column!r}: use the same settings")


def _shard_tensors(rows: list[dict]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(r["lse"]) for r in rows])
    out = {k: torch.cat([r[k] for r in rows]).contiguous() for k in ("values", "indices", "lse", "gold")}
    out["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return out


@torch.no_grad()
def teacher_rows(teacher, ids: list[list[int]], pad_id: int, top_k: int, device) -> list[dict]:
    """Per example: top-k logits (float32) and indices (int32), log-sum-exp and the next token's logit
    (0 at the last position, which has no next token), one row per token."""
    width = max(map(len, ids))
    batch = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
    logits = teacher(input_ids=batch, attention_mask=mask).logits.float()
    values, indices = logits.topk(top_k, dim=-1)
    lse = logits.logsumexp(-1)
    nxt = torch.cat([batch[:, 1:], torch.zeros_like(batch[:, :1])], 1)
    gold = logits.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    gold[:, -1] = 0
    rows = []
    for i, x in enumerate(ids):
        n = len(x)
        g = gold[i, :n].clone()
        g[n - 1] = 0
        rows.append({"values": values[i, :n].cpu(), "indices": indices[i, :n].int().cpu(), "lse": lse[i, :n].cpu(),
                     "gold": g.cpu()})
    return rows


def write_teacher_logits(teacher: str, train_file: str, top_k: int, output_dir: str, *, max_length: int = 128,
                         batch_size: int = 16, text_column: str = "text", shard_tokens: int = 1_000_000,
                         overwrite: bool = False, model=None) -> dict:
    """Write the teacher's logits over `train_file` to `output_dir`; returns a summary (paths, sizes)."""
    from .models import ensure_pad, is_causal_lm, load_config, load_lm, load_tokenizer, max_tokens
    from .output_dir import begin_run, claim_output_dir

    sources = {"teacher": teacher}
    out = claim_output_dir(output_dir, sources=sources, overwrite=overwrite)
    if top_k < 1:
        raise DistillConfigError(f"--top-k must be >= 1, got {top_k}")
    texts = read_texts(train_file, text_column)
    config = model.config if model is not None else load_config(teacher)
    if not is_causal_lm(config):
        raise DistillConfigError(f"teacher {teacher!r} is a masked LM: its logits depend on the masks, which training "
                                 "draws afresh at every step, so they cannot be stored once. Offline logits need a "
                                 "causal LM teacher; distil a masked LM with a live teacher (train --teacher).")
    if top_k > config.vocab_size:
        raise DistillConfigError(f"--top-k {top_k} exceeds the teacher's vocabulary ({config.vocab_size})")
    tokenizer = load_tokenizer(teacher)
    if tokenizer is None:
        raise DistillConfigError(f"no tokenizer saved with {teacher!r}: offline logits need the teacher's tokenizer")
    tokenizer = ensure_pad(tokenizer)
    length = max_tokens(config, max_length)
    data = TokenizedTexts(texts, tokenizer, length, 2, source=train_file, why="a causal LM needs a next token")
    model = model if model is not None else load_lm(teacher)
    device = next(model.parameters()).device
    model.eval()
    begin_run(out, sources=sources, overwrite=overwrite)
    shards, rows, first, tokens = [], [], 0, 0
    for start in range(0, len(data), batch_size):
        rows += teacher_rows(model, data.examples[start:start + batch_size], tokenizer.pad_token_id, top_k, device)
        if sum(len(r["lse"]) for r in rows) >= shard_tokens or start + batch_size >= len(data):
            name = SHARD.format(len(shards))
            save_file(_shard_tensors(rows), str(out / name))
            shards.append((name, first, len(rows)))
            first += len(rows)
            tokens += sum(len(r["lse"]) for r in rows)
            rows = []
    manifest = Manifest(teacher=str(teacher), top_k=top_k, vocab_size=config.vocab_size, max_length=length,
                        add_special_tokens=True, min_length=2, text_column=text_column,
                        tokenizer_sha256=sha256_tokenizer(tokenizer), corpus_sha256=sha256_texts(texts),
                        num_examples=len(data), num_tokens=tokens, shards=tuple(shards))
    manifest.write(out)
    size = sum((out / s[0]).stat().st_size for s in shards)
    return {"output_dir": str(out), "examples": len(data), "tokens": tokens, "shards": len(shards), "bytes": size,
            "bytes_per_million_tokens": round(size / tokens * 1e6), "top_k": top_k}


class OfflineTeacherLogits(Dataset):
    """The tokenized corpus with each example's stored teacher logits (row i of the corpus is row i of the shards).

    Shards are memory-mapped (`safe_open`): an item reads only its own rows, so the corpus' logits need
    not fit in memory."""

    def __init__(self, data: TokenizedTexts, directory: str | Path, manifest: Manifest):
        if len(data) != manifest.num_examples:
            raise DistillConfigError(f"the corpus gives {len(data)} examples, the teacher logits hold "
                                     f"{manifest.num_examples}: they were written from another tokenization")
        self.data, self.manifest, self.shards = data, manifest, []
        for name, first, count in manifest.shards:
            path = Path(directory) / name
            if not path.is_file():
                raise DataError(f"teacher-logits shard {path} is missing")
            with safe_open(str(path), "pt") as f:
                offsets = f.get_tensor("offsets")
            self.shards.append((first, count, path, offsets))
        self._open: dict[Path, object] = {}
        for i in (0, len(data) - 1):  # the shards line up with the corpus (each example's token count)
            if self._row(i)["lse"].shape[0] != len(data.examples[i]):
                raise DistillConfigError("the teacher logits do not line up with the tokenized corpus: write them again")

    def _row(self, i: int) -> dict:
        for first, count, path, offsets in self.shards:
            if first <= i < first + count:
                if path not in self._open:  # opened on first use (in each dataloader worker)
                    self._open[path] = safe_open(str(path), "pt")
                f, a, b = self._open[path], int(offsets[i - first]), int(offsets[i - first + 1])
                return {k: f.get_slice(k)[a:b] for k in ("values", "indices", "lse", "gold")}
        raise IndexError(i)

    def __len__(self) -> int:
        return len(self.data)

    def __getstate__(self):  # open shard handles do not pickle (dataloader workers open their own)
        return {**self.__dict__, "_open": {}}

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], **{"teacher_" + k: v for k, v in self._row(i).items()}}


class OfflineCollator(Collator):
    """`Collator` plus the stored teacher tensors, padded along the sequence (padding is never counted)."""

    def __call__(self, features: list[dict]) -> dict:
        batch = super().__call__([{k: v for k, v in f.items() if not k.startswith("teacher_")} for f in features])
        width = batch["input_ids"].shape[1]
        for key in ("teacher_values", "teacher_indices", "teacher_lse", "teacher_gold"):
            rows = [f[key] for f in features]
            pad = [(0, 0) * (r.dim() - 1) + (0, width - r.shape[0]) for r in rows]
            batch[key] = torch.stack([torch.nn.functional.pad(r, p) for r, p in zip(rows, pad)])
        return batch


def check_offline(weights: dict[str, float], cfg) -> None:
    """Before any model loads: only objectives computable from stored logits, no periodic evaluation."""
    bad = [k for k in weights if k not in OFFLINE_OBJECTIVES]
    if bad:
        why = "; ".join(f"'{k}' {WHY_NOT.get(k, 'needs the live teacher')}" for k in bad)
        raise DistillConfigError(f"--teacher-logits trains only {', '.join(OFFLINE_OBJECTIVES)} (give --objectives, "
                                 f"e.g. ce,clm); refused: {why}")
    if cfg.eval_steps:
        raise DistillConfigError("--eval-steps evaluates the training losses on --eval-file, which needs teacher "
                                 "logits of that file: drop --eval-steps with --teacher-logits")


class OfflineDistillation(Method):
    """KD (top-k renormalised, any temperature), ATKD (exact p_g) and CLM from stored teacher logits."""

    def __init__(self, weights: dict[str, float], temperature: float, atkd: ATKDConfig):
        super().__init__()
        self.weights, self.temperature, self.atkd = dict(weights), temperature, atkd

    def losses(self, model, inputs, step):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        logits = model(input_ids=ids, attention_mask=mask).logits
        w, out = self.weights, {}
        if "clm" in w:
            out["clm"] = clm_loss(logits, labels)
        if "ce" in w:
            out["ce"] = topk_kd_loss(logits, inputs["teacher_values"], inputs["teacher_indices"], mask, self.temperature)
        if "atkd" in w:
            out["atkd"] = topk_atkd_objective(logits, inputs["teacher_values"], inputs["teacher_indices"],
                                              inputs["teacher_lse"], inputs["teacher_gold"], labels,
                                              config=self.atkd, check=False)[0]
        out["loss"] = sum(w[k] * out[k] for k in w)
        return out
