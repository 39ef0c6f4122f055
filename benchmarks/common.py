"""What the speed benchmarks share: a random GPT-2 from a config, interleaved timing on one clock,
and the installed version of a package.

Timings interleave the runs (one call of each per round), so a change in machine load touches
every tool alike. The clock is wall time, or this process's CPU time after `use_process_time()`
(single-threaded runs on a busy machine: what the work costs, not how long others held the core).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from importlib import metadata

import torch
import transformers as tf

_clock: Callable[[], float] = time.perf_counter


def use_process_time() -> None:
    """Time in this process's CPU time from now on (for runs with one torch thread)."""
    global _clock
    _clock = time.process_time


def clock_name() -> str:
    return "process CPU time" if _clock is time.process_time else "wall time"


def now() -> float:
    return _clock()


def timed(fn):
    """(result, seconds) of one call, on the benchmarks' clock."""
    start = _clock()
    out = fn()
    return out, _clock() - start


def interleaved_times(runs: dict[str, Callable], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each run per round, after `warmup` untimed calls of each; one call of each per round."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = _clock()
            fn()
            times[name].append(_clock() - start)
    return times


def median_times(runs: dict[str, Callable], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each run over interleaved rounds."""
    return {name: statistics.median(t) for name, t in interleaved_times(runs, repeats, warmup).items()}


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b) in the same round (cancels slow drifts in load)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def random_gpt2(layers: int, width: int, heads: int, vocab: int, positions: int = 1024, attn: str | None = None,
                **config) -> tf.GPT2LMHeadModel:
    """A random GPT-2 (seed 0, no dropout, eval mode) built from a config: no downloads. `config` adds
    GPT2Config fields (use_cache, bos_token_id, ...); `attn` picks the attention implementation."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=positions,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **config)
    if attn is not None:
        return tf.GPT2LMHeadModel._from_config(cfg, attn_implementation=attn).eval()
    return tf.GPT2LMHeadModel(cfg).eval()


def version(dist: str) -> str:
    """The installed version of a distribution ('not installed' when absent)."""
    try:
        return metadata.version(dist.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "not installed"
