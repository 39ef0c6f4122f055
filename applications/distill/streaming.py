"""`--streaming`: the training corpus read through `datasets` as an iterable dataset, in constant memory.

`StreamedCorpus` opens a .txt / .jsonl file (`load_dataset("text" | "json", streaming=True)`) or a saved
dataset (`load_from_disk(...).to_iterable_dataset()`) and peeks at its first record, so an empty or
unreadable corpus fails before any model loads. `StreamedTexts` tokenizes it on the fly
(`IterableDataset.map`, batched) with the map-style rules of `TokenizedTexts` (truncation to
`max_length`, examples shorter than `min_length` dropped) and repeats it endlessly, pass after pass
(with a shuffle buffer: reshuffled each pass by `set_epoch(pass)`), so the Trainer sees one
never-ending epoch of full batches and `--max-steps` alone ends training.

Examples carry `idx`, their position among the corpus' non-empty records (the index `read_texts` would
give them), attached before any shuffling: it keys their masks and spans (seeding.py) exactly as in
map-style training. The stream is a pure function of (corpus, seed, shuffle buffer), so a resumed run
that consumes the batches it already trained on (the Trainer's `skip_first_batches`) continues with
the example the uninterrupted run would have seen next.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from .data import load_saved_dataset, tokenize
from .errors import DataError, DistillConfigError

logger = logging.getLogger("applications.distill")

#: Records tokenized per `IterableDataset.map` call (memory is bounded by this, not the corpus).
MAP_BATCH = 1000
#: Bytes of a .txt / .jsonl file the `datasets` builders read and parse at a time (their default, 10 MB,
#: held about 85 MB of Python strings and Arrow buffers at a time; docs/benchmarks.md).
READ_CHUNK = 1 << 20


def check_streaming_options(cfg) -> None:
    """Refuse the combinations `--streaming` cannot serve, before anything is read or loaded."""
    if not cfg.streaming:
        if cfg.shuffle_buffer:
            raise DistillConfigError("--shuffle-buffer shuffles a streamed corpus; give --streaming too (map-style "
                                     "training shuffles the whole corpus every epoch already)")
        return
    if cfg.max_steps is None:
        raise DistillConfigError("--streaming needs --max-steps: a streamed corpus has no length, so the number of "
                                 "epochs cannot be turned into steps (the stream repeats until --max-steps)")
    if cfg.teacher_logits is not None:
        raise DistillConfigError("--teacher-logits cannot be combined with --streaming: the stored logits are "
                                 "looked up by example index in a map-style dataset; drop one of the two")
    if cfg.shuffle_buffer < 0:
        raise DistillConfigError(f"shuffle_buffer (--shuffle-buffer) must be >= 0 (0: stream order), got "
                                 f"{cfg.shuffle_buffer}")


def _open(path: str, text_column: str):
    """The corpus at `path` as a `datasets.IterableDataset` of raw records (one shard, in file order)."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {path!r} does not exist")
    if p.is_dir():
        ds = load_saved_dataset(p, text_column)
        return ds.select_columns([text_column]).to_iterable_dataset(num_shards=1)
    builder = "json" if p.suffix in (".jsonl", ".json") else "text"
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", streaming=True, chunksize=READ_CHUNK)
    except StopIteration:  # the json builder found no record to infer the columns from
        raise DataError(f"data file {path!r} holds no text (no non-empty line or record)") from None
    except Exception as e:
        raise DataError(f"cannot open data file {path!r} for streaming: {e}") from e
    if builder == "text" and text_column != "text":
        ds = ds.rename_column("text", text_column)
    return ds


class StreamedCorpus:
    """The non-empty texts of a corpus, read record by record (re-iterable; nothing is kept in memory).

    Opening it reads the first record: a missing file, an unreadable one, bad JSON at its start, a
    missing text column or a corpus without any non-empty text raise DataError here."""

    def __init__(self, path: str, text_column: str = "text"):
        self.path, self.text_column = str(path), text_column
        raw = _open(self.path, text_column)
        self.records = raw.filter(self._non_empty).map(lambda batch, ids: {"idx": ids}, with_indices=True,
                                                       batched=True)
        if next(iter(self), None) is None:
            raise DataError(f"data file {self.path!r} holds no text (no non-empty line or record)")

    def _non_empty(self, record: dict) -> bool:
        if self.text_column not in record or record[self.text_column] is None:
            raise DataError(f"{self.path}: a record has no '{self.text_column}' field (record: {str(record)[:200]})")
        return bool(str(record[self.text_column]).strip())

    def iter_records(self, records=None) -> Iterator[dict]:
        """Records of `records` (default: the corpus in file order), read errors raised as DataError."""
        it = iter(self.records if records is None else records)
        while True:
            try:
                record = next(it)
            except StopIteration:
                return
            except DataError:
                raise
            except (ValueError, OSError, TypeError, UnicodeDecodeError) as e:  # pyarrow's parse errors are ValueErrors
                raise DataError(f"cannot read data file {self.path!r}: {e}") from e
            yield record

    def __iter__(self) -> Iterator[str]:
        """The stripped texts (what `read_texts` returns, one at a time): e.g. to train a tokenizer."""
        for record in self.iter_records():
            yield str(record[self.text_column]).strip()


class StreamedTexts(IterableDataset):
    """Token id lists with their `idx`, tokenized on the fly and repeated endlessly (pass after pass).

    The rules of `TokenizedTexts`: truncation to `max_length`, examples under `min_length` tokens
    dropped. `dropped` / `truncated` / `examples` describe one whole pass once one has been read
    (`token_counts` reads one; so does a pass of training), None before. No `__len__`: the Trainer
    sees a stream and trains for --max-steps."""

    def __init__(self, corpus: StreamedCorpus, tokenizer, max_length: int, min_length: int = 1,
                 shuffle_buffer: int = 0, seed: int = 0, why: str = "the interchange span needs that many"):
        self.corpus, self.tokenizer = corpus, tokenizer
        self.max_length, self.min_length, self.source, self.why = max_length, min_length, corpus.path, why
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.examples: int | None = None
        self.dropped: int | None = None
        self.truncated: int | None = None
        records = corpus.records.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else corpus.records
        self.stream = records.map(self._tokenize, batched=True, batch_size=MAP_BATCH,
                                  remove_columns=[corpus.text_column])

    def _tokenize(self, batch: dict) -> dict:
        texts = [str(t).strip() for t in batch[self.corpus.text_column]]
        ids, truncated = tokenize(self.tokenizer, texts, self.max_length)
        return {"input_ids": ids, "truncated": truncated}

    def one_pass(self, epoch: int = 0) -> Iterator[dict]:
        """One pass over the corpus: {"input_ids", "idx"} per kept example (order of pass `epoch`)."""
        self.stream.set_epoch(epoch)
        kept = dropped = truncated = 0
        for record in self.corpus.iter_records(self.stream):
            if len(record["input_ids"]) < self.min_length:
                dropped += 1
                continue
            kept += 1
            truncated += record["truncated"]
            yield {"input_ids": record["input_ids"], "idx": record["idx"]}
        if not kept:
            raise DataError(f"{self.source}: every example is shorter than {self.min_length} tokens after "
                            f"tokenizing ({self.why}); give longer texts.")
        if self.examples is None:
            self.examples, self.dropped, self.truncated = kept, dropped, truncated
            (logger.warning if dropped or truncated else logger.info)(self.report())

    def __iter__(self) -> Iterator[dict]:
        for epoch in count():
            yield from self.one_pass(epoch)

    def first(self, n: int) -> list[dict]:
        """Up to `n` kept examples from the start of the first pass (a bounded peek)."""
        out: list[dict] = []
        for example in self.one_pass(0):
            out.append(example)
            if len(out) == n:
                break
        return out

    def report(self) -> str:
        """One line for the log (counts of one pass, once one has been read)."""
        if self.examples is None:
            return (f"{self.source}: streamed (counts after the first pass); examples shorter than "
                    f"{self.min_length} tokens are dropped, longer than {self.max_length} truncated")
        return (f"{self.source}: streamed, {self.examples} examples a pass; {self.dropped} dropped as shorter "
                f"than {self.min_length} tokens; {self.truncated} truncated to {self.max_length} tokens")

    def summary(self) -> dict:
        return {"streaming": True, "examples": self.examples, "dropped_short": self.dropped,
                "truncated": self.truncated, "shuffle_buffer": self.shuffle_buffer}

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each vocabulary id occurs in one pass (for the count^-0.7 masking weights): one
        streaming pass, a vocabulary-sized counter in memory."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        chunk: list[int] = []
        for example in self.one_pass(0):
            chunk += example["input_ids"]
            if len(chunk) >= 1 << 16:
                counts += self._bincount(chunk, vocab_size)
                chunk = []
        return counts + self._bincount(chunk, vocab_size)

    @staticmethod
    def _bincount(ids: list[int], vocab_size: int) -> torch.Tensor:
        return torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size)[:vocab_size]


def streaming_arguments(cfg) -> dict:
    """TrainingArguments a streamed corpus needs: every process reads the stream and keeps its own share
    of each window of (batch x processes) examples (accelerate's IterableDatasetShard), instead of
    process 0 concatenating padded batches of different widths and broadcasting them (its default for
    iterable datasets, which cannot carry our `idx` lists)."""
    return {"accelerator_config": {"dispatch_batches": False}} if cfg.streaming else {}
