"""Interventions inside `model.generate()` with the key/value cache, against a manual no-cache loop.

The oracle decodes greedily without a cache: every step recomputes the whole sequence with a
hand-written torch hook (no library code) that edits the site at the positions the rule names —
non-negative positions index the full sequence (set at every step, as the cache keeps the value set
when it was computed), and ``positions=[-1]`` under the cache is every position from the prompt's
last onwards in the no-cache loop.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import build, hook_ids, tokens

import interventions as iv
from interventions import Add, Site, set_value
from interventions.errors import SelectorError

PROMPT, STEPS = 7, 5
GENERATE = dict(max_new_tokens=STEPS, do_sample=False, use_cache=True, output_logits=True,
                return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)


def module_for(model, layer: int, what: str):
    """The module whose output is the site, by hand for each family."""
    block = model.transformer.h[layer] if model.config.model_type == "gpt2" else model.model.layers[layer]
    if what == "output":
        return block
    if what == "mlp_output":
        return block.mlp
    return block.attn if model.config.model_type == "gpt2" else block.self_attn  # attention_output


def manual_loop(model, prompt, module, edit):
    """Greedy decoding without a cache; `edit(hidden, seq_len)` edits `module`'s output at every forward."""
    ids, step_logits = prompt, []

    def hook(mod, args, output):
        x = output if isinstance(output, torch.Tensor) else output[0]
        new = edit(x.clone(), ids.shape[1])
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for _ in range(STEPS):
                logits = model(ids, use_cache=False).logits[:, -1]
                step_logits.append(logits)
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    finally:
        handle.remove()
    return ids, torch.stack(step_logits)


def generate(model, prompt, values=None):
    mask = torch.ones_like(prompt)  # else generate masks every token equal to pad_token_id
    with torch.no_grad():
        if values is None:
            out = model.generate(prompt, attention_mask=mask, **GENERATE)
        else:
            with set_value(model, values):
                out = model.generate(prompt, attention_mask=mask, **GENERATE)
    return out.sequences, torch.stack(out.logits)


def assert_same(got, expected, plain):
    (seq, logits), (seq_e, logits_e) = got, expected
    # generate hands back its logits in float32; the model runs in float64
    torch.testing.assert_close(logits.double(), logits_e, rtol=0, atol=1e-5)
    assert torch.equal(seq, seq_e)
    assert (logits - plain[1]).abs().max() > 1e-3  # the intervention did change the generation


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request):
    return build(request.param)


def test_steering_with_add_at_the_last_position_equals_the_no_cache_loop(lm):
    prompt = tokens(2, PROMPT, seed=1)
    vector = 2.0 * torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = generate(lm, prompt, {Site("layers.0.output", positions=[-1]): Add(vector)})

    def edit(x, seq_len):  # every position from the prompt's last onwards
        x[:, PROMPT - 1:] += vector
        return x

    assert_same(got, manual_loop(lm, prompt, module_for(lm, 0, "output"), edit), generate(lm, prompt))


def test_set_value_with_a_callable_equals_the_no_cache_loop(lm):
    prompt = tokens(2, PROMPT, seed=2)
    got = generate(lm, prompt, {Site("layers.1.mlp_output", positions=[-1]): lambda cur: -3.0 * cur})

    def edit(x, seq_len):
        x[:, PROMPT - 1:] *= -3.0
        return x

    assert_same(got, manual_loop(lm, prompt, module_for(lm, 1, "mlp_output"), edit), generate(lm, prompt))


def test_a_fixed_position_is_set_once_and_kept_in_the_cache(lm):
    """positions=[5] (today a bare IndexError at the first decode step): set when computed, skipped after."""
    prompt = tokens(2, PROMPT, seed=3)
    value = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = generate(lm, prompt, {Site("layers.0.attention_output", positions=[5]): value})

    def edit(x, seq_len):
        x[:, 5] = value[:, 0]
        return x

    assert_same(got, manual_loop(lm, prompt, module_for(lm, 0, "attention_output"), edit), generate(lm, prompt))


def test_mixed_positions_keep_the_right_part_of_a_tensor_value(lm):
    """positions=[2, -1] with a [1, 2, hidden] value: position 2 is cached after the prompt, -1 is each new token."""
    prompt = tokens(2, PROMPT, seed=4)
    value = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = generate(lm, prompt, {Site("layers.1.output", positions=[2, -1]): value})

    def edit(x, seq_len):
        x[:, 2] = value[:, 0]
        x[:, PROMPT - 1:] = value[:, 1]
        return x

    assert_same(got, manual_loop(lm, prompt, module_for(lm, 1, "output"), edit), generate(lm, prompt))


def test_a_plain_call_has_an_empty_cache(gpt2):
    """Without a cache, positions mean what they always did: set_value at [1, -2] equals a hand-written hook."""
    x = tokens(2, 6, seed=5)
    with torch.no_grad(), set_value(gpt2, {Site("layers.0.output", positions=[1, -2]): iv.Zero()}):
        got = gpt2(x).logits
    handle = gpt2.transformer.h[0].register_forward_hook(lambda m, a, out: out.index_fill(1, torch.tensor([1, 4]), 0))
    try:
        with torch.no_grad():
            expected = gpt2(x).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("positions, tokens_in", [([7], 6), ([6], 6), ([-7], 6), ([0, 9], 6)])
def test_positions_beyond_the_sequence_raise_before_anything_is_written(gpt2, positions, tokens_in):
    """The context-manager form (today a bare IndexError) raises SelectorError before any site is reached."""
    before = hook_ids(gpt2)
    reached = []
    handle = gpt2.transformer.h[0].register_forward_pre_hook(lambda *a: reached.append(1))
    try:
        with pytest.raises(SelectorError, match="out of range.*valid 0..5"), torch.no_grad():
            with set_value(gpt2, {Site("layers.1.output", positions=positions): iv.Zero()}):
                gpt2(tokens(1, tokens_in, seed=6))
    finally:
        handle.remove()
    assert reached == []
    assert hook_ids(gpt2) == before
    with pytest.raises(SelectorError, match="out of range"):  # the functional form agrees
        set_value(gpt2, {Site("layers.1.output", positions=positions): iv.Zero()}, tokens(1, tokens_in, seed=6))


def test_a_position_past_the_prompt_raises_inside_generate(gpt2):
    before = hook_ids(gpt2)
    with pytest.raises(SelectorError, match=r"positions \[9\] out of range.*sequence has 7"), torch.no_grad():
        with set_value(gpt2, {Site("layers.0.output", positions=[9]): iv.Zero()}):
            gpt2.generate(tokens(1, PROMPT, seed=7), **GENERATE)
    assert hook_ids(gpt2) == before


def test_the_documented_steering_example_runs():
    """docs/workflows.md's steering-while-generating example runs as written and steers."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "workflows.md").read_text()
    section = text.split("## Steering while generating", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "docs/workflows.md steering", "exec"), scope)
    assert scope["steered"].shape == scope["plain"].shape
    assert not torch.equal(scope["steered"], scope["plain"])


@pytest.mark.parametrize("form", ["context manager", "functional"])
def test_a_manual_decode_step_indexes_the_full_sequence(gpt2, form):
    """One decode step by hand (cache from a plain call): positions=[6] is the new token of a 7-token sequence,
    and [2] (in the cache) is skipped — the same logits as the full 7-token forward with a hook at 6."""
    ids = tokens(2, 7, seed=8)
    value = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        cache = gpt2(ids[:, :6], use_cache=True).cache
        step = {"input_ids": ids[:, 6:], "cache": cache, "use_cache": True}
        values = {Site("layers.0.output", positions=[6]): value, Site("layers.1.output", positions=[2]): iv.Zero()}
        if form == "functional":
            got = set_value(gpt2, values, step).logits[:, -1]
        else:
            with set_value(gpt2, values):
                got = gpt2(**step).logits[:, -1]

        def hook(module, args, output):
            output = output.clone()
            output[:, 6] = value[:, 0]
            return output

        handle = gpt2.transformer.h[0].register_forward_hook(hook)
        try:
            expected = gpt2(ids, use_cache=False).logits[:, -1]
        finally:
            handle.remove()
        plain = gpt2(ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)
    assert (got - plain).abs().max() > 1e-3
