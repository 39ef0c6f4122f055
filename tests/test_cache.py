"""record_blocks / replay_blocks against plain forwards and the public `interchange` (tiny float64 models)."""

import pytest
import torch

from interventions import (
    InterventionError,
    ShapeError,
    Site,
    SiteGraph,
    get_value,
    interchange,
    record_blocks,
    replay_blocks,
    set_value,
)
from tests.conftest import tokens


def _logits(out):
    return out.logits


def test_recording_equals_get_value(tiny):
    x = tokens(3, 7, seed=1)
    with record_blocks(tiny) as rec:
        tiny(x)
    want = get_value(tiny, x, ["layers.0.output", "layers.1.output"])
    for i in range(2):
        torch.testing.assert_close(rec.value(i), want[f"layers.{i}.output"], rtol=0, atol=0)
    assert "forward" not in tiny.get_submodule("model.layers.0" if hasattr(tiny, "model") else "transformer.h.0").__dict__


@pytest.mark.parametrize("upto", [0, 1])
def test_replay_without_change_is_the_plain_forward(tiny, upto):
    x = tokens(2, 6, seed=2)
    with record_blocks(tiny) as rec:
        plain = tiny(x).logits
    with replay_blocks(tiny, rec, upto=upto):
        again = tiny(x).logits
    torch.testing.assert_close(again, plain, rtol=1e-12, atol=1e-12)


def test_replayed_interchange_equals_public_interchange(tiny):
    base, source = tokens(2, 6, seed=3), tokens(2, 6, seed=4)
    bpos = torch.tensor([[1, 2], [3, 4]])
    spos = torch.tensor([[0, 5], [2, 2]])
    want = interchange(tiny, base, source, Site("layers.0.output", positions=bpos),
                       source_sites=Site("layers.0.output", positions=spos)).logits
    with record_blocks(tiny) as rec_s:
        tiny(source)
    src = rec_s.value(0)
    with record_blocks(tiny) as rec_b:
        tiny(base)
    rows = torch.arange(2)[:, None]
    with replay_blocks(tiny, rec_b, upto=0), set_value(tiny, {Site("layers.0.output", positions=bpos): src[rows, spos]}):
        got = tiny(base).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_two_sites_replay_from_the_lower(tiny):
    base, source = tokens(2, 5, seed=5), tokens(2, 5, seed=6)
    sites = [Site("layers.0.output", positions=[1, 2]), Site("layers.1.output", positions=[1, 2])]
    want = interchange(tiny, base, source, sites).logits
    src = get_value(tiny, source, sites)
    with record_blocks(tiny) as rec:
        tiny(base)
    with replay_blocks(tiny, rec, upto=0), set_value(tiny, {s: src[s] for s in sites}):
        got = tiny(base).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_replayed_blocks_do_not_run(tiny):
    graph = SiteGraph.from_model(tiny)
    calls = []
    handles = [graph.point(f"layers.{i}.attention_output").module.register_forward_hook(
        lambda m, a, o, i=i: calls.append(i)) for i in range(2)]
    try:
        x = tokens(1, 4, seed=7)
        with record_blocks(tiny) as rec:
            tiny(x)
        calls.clear()
        with replay_blocks(tiny, rec, upto=0):
            tiny(x)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1]


def test_gradients_through_replay_equal_recomputation(gpt2):
    model = gpt2
    base = tokens(2, 5, seed=8)
    site = Site("layers.0.output", positions=[2, 3])
    bump = lambda v: v * 1.5

    def grads(use_replay):
        model.zero_grad()
        with record_blocks(model) as rec:
            out = model(base).logits
        if use_replay:
            with replay_blocks(model, rec, upto=0), set_value(model, {site: bump}):
                cf = model(base).logits
        else:
            with set_value(model, {site: bump}):
                cf = model(base).logits
        (out.square().mean() + cf.tanh().sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    a, b = grads(True), grads(False)
    model.zero_grad()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-12)


def test_replay_on_other_shapes_is_refused_and_cleaned_up(gpt2):
    with record_blocks(gpt2) as rec:
        gpt2(tokens(2, 5, seed=9))
    with pytest.raises(ShapeError, match="batch/sequence shape"), replay_blocks(gpt2, rec, upto=0):
        gpt2(tokens(2, 6, seed=9))
    assert all("forward" not in b.__dict__ for b in gpt2.transformer.h)
    with pytest.raises(InterventionError, match="not recorded"):
        with record_blocks(gpt2, layers=[1]) as partial:
            gpt2(tokens(1, 3, seed=1))
        with replay_blocks(gpt2, partial, upto=1):
            pass
    with pytest.raises(InterventionError, match="out of range"), record_blocks(gpt2, layers=[5]):
        pass


def test_replay_upto_out_of_range(gpt2):
    with record_blocks(gpt2) as rec:
        gpt2(tokens(1, 3, seed=2))
    with pytest.raises(InterventionError, match=r"upto=2 out of range.*valid -1\.\.1"), replay_blocks(gpt2, rec, upto=2):
        pass
    assert all("forward" not in b.__dict__ for b in gpt2.transformer.h)
