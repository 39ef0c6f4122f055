"""Reading text (plain lines, jsonl, a `datasets` dataset saved on disk), tokenizing, batching.

Each non-empty line / record is one example, truncated to `max_length` tokens. Examples carry their
dataset index (`idx`), which keys their masking and spans (see seeding.py). `train_tokenizer` makes a
tokenizer with the `tokenizers` library for teachers that come without one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .errors import DataError


def read_texts(path: str, text_column: str = "text") -> list[str]:
    """The non-empty texts of a .txt file (one per line), a .jsonl file, or a saved `datasets` dataset."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {path!r} does not exist")
    if p.is_dir():
        texts = _read_saved_dataset(p, text_column)
    else:
        try:
            raw = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read data file {path!r} as UTF-8 text: {e}") from e
        if p.suffix in (".jsonl", ".json"):
            texts = []
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON object per line ({e})") from e
                if not isinstance(record, dict) or text_column not in record:
                    raise DataError(f"{path}:{n}: each JSON line needs a '{text_column}' field")
                texts.append(str(record[text_column]))
        else:
            texts = raw.splitlines()
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise DataError(f"data file {path!r} holds no text (no non-empty line or record)")
    return texts


def _read_saved_dataset(p: Path, text_column: str) -> list[str]:
    return list(load_saved_dataset(p, text_column)[text_column])


def load_saved_dataset(p: Path, text_column: str):
    """A dataset saved with save_to_disk (a DatasetDict's 'train' split), checked to have `text_column`."""
    try:
        import datasets

        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # any failure to open becomes one clear message
        raise DataError(f"{str(p)!r} is a directory but not a dataset saved with save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"saved DatasetDict {str(p)!r} has no 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    if text_column not in ds.column_names:
        raise DataError(f"dataset {str(p)!r} has no column '{text_column}' (columns: {ds.column_names})")
    return ds


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Each text's token ids (special tokens added) cut to `max_length`, and whether it was cut: one call on
    every text, then the tokenizer's own truncation only on those too long (shorter ones come out the same)."""
    ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    long = [i for i, x in enumerate(ids) if len(x) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_length,
                        add_special_tokens=True)["input_ids"]
        for i, x in zip(long, cut):
            ids[i] = x
    truncated = [False] * len(ids)
    for i in long:
        truncated[i] = True
    return ids, truncated


#: Texts per tokenizer call: whole-corpus calls peak at several times the ids' own size.
TOKENIZE_CHUNK = 1000


class TokenizedTexts(Dataset):
    """Token id lists with their dataset index; `min_length` drops shorter examples (counted in `dropped`),
    and `truncated` counts the examples cut to `max_length` tokens."""

    def __init__(self, texts: Sequence[str], tokenizer, max_length: int, min_length: int = 1, source: str = "data",
                 why: str = "the interchange span needs that many"):
        texts = list(texts)
        self.examples, self.truncated, total = [], 0, 0
        for start in range(0, len(texts), TOKENIZE_CHUNK):  # in chunks: the tokenizer's own buffers stay small
            encoded, cut = tokenize(tokenizer, texts[start:start + TOKENIZE_CHUNK], max_length)
            self.truncated += sum(cut)
            self.examples += [ids for ids in encoded if len(ids) >= min_length]
            total += len(encoded)
        self.dropped = total - len(self.examples)
        self.min_length, self.max_length, self.source = min_length, max_length, source
        if not self.examples:
            raise DataError(
                f"{source}: every example is shorter than {min_length} tokens after tokenizing ({why}); "
                "give longer texts."
            )

    def report(self) -> str:
        """One line for the log: examples kept, dropped as too short, truncated to max_length."""
        return (f"{self.source}: {len(self.examples)} examples; {self.dropped} dropped as shorter than "
                f"{self.min_length} tokens; {self.truncated} truncated to {self.max_length} tokens")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.examples[i], "idx": i}

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each vocabulary id occurs (for the count^-0.7 masking weights)."""
        flat = torch.tensor([t for ids in self.examples for t in ids], dtype=torch.long)
        return torch.bincount(flat, minlength=vocab_size)[:vocab_size]


class Collator:
    """Right-pads examples into input_ids / attention_mask tensors (the Trainer moves them to the device).

    `idx` (dataset indices, which key the random draws) and `lengths` stay Python lists, so a step
    never reads them back from the device. Class labels (a `labels` int per example) become a
    tensor; `lm_labels` adds next-token labels (the input ids, -100 on padding).
    """

    def __init__(self, pad_token_id: int, lm_labels: bool = False):
        self.pad_token_id, self.lm_labels = pad_token_id, lm_labels

    def __call__(self, features: list[dict]) -> dict:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        ids = torch.tensor([f["input_ids"] + [self.pad_token_id] * (width - n) for f, n in zip(features, lengths)])
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
        batch = {"input_ids": ids, "attention_mask": mask, "idx": [f["idx"] for f in features], "lengths": lengths}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        elif self.lm_labels:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        return batch


#: BERT's special tokens, in the id order both BERT-style tokenizers here give them (0..4).
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: Sequence[str], vocab_size: int, causal: bool):
    """A fast tokenizer trained on `texts`: WordPiece with BERT specials (masked LMs) or byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if causal:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<pad>"]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                       pad_token="<pad>", unk_token="<|endoftext|>")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS))
    # The trainer's numbering varies from run to run: renumber in sorted order (ties at the vocabulary
    # cutoff can still change the learned set itself).
    learned = sorted(set(tok.get_vocab()) - set(BERT_SPECIALS))
    tok.model = models.WordPiece({t: i for i, t in enumerate(BERT_SPECIALS + learned)}, unk_token="[UNK]")
    tok.decoder = decoders.WordPiece()
    return _bert_style(tok)


def _bert_style(tok):
    """A PreTrainedTokenizerFast with BERT's special tokens and [CLS] ... [SEP] framing around `tok`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def word_tokenizer(texts: Sequence[str]):
    """A deterministic word-level tokenizer (BERT specials, lowercased words and punctuation, sorted ids)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    pre = pre_tokenizers.BertPreTokenizer()
    norm = normalizers.BertNormalizer(lowercase=True)
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(BERT_SPECIALS + words)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    return _bert_style(tok)
