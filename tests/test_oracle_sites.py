"""The sites of issue 12 (residual_mid, mlp_hidden, final_norm) against the hand-written forwards.

Same protocol as tests/test_oracle.py: read, set (tensor and callable), interchange and zero each
site with every selector combination, and compare with tests/oracles.py run with the same edit.
The attention-internal sites (queries, keys, values, attention_pattern) extend `NEW_SITES`.
"""

from __future__ import annotations

import oracles
import pytest
import torch
from conftest import hook_ids
from test_oracle import BASE, FAMILIES, SOURCE, TOL, ids, models, random_like, selectors  # noqa: F401

from interventions import Site, SiteGraph, Zero, get_value, interchange, set_value

NEW_SITES = [f"layers.{i}.{k}" for i in range(2) for k in ("residual_mid", "mlp_hidden")] + ["final_norm"]


def test_new_sites_are_in_the_graph_in_oracle_order(models):
    for model in models.values():
        graph = SiteGraph.from_model(model)
        clean = oracles.forward(model, BASE)
        order = [s for s in clean if s in graph.sites]
        assert order == graph.sites  # the graph lists sites in the oracle's computation order
        assert set(NEW_SITES) <= set(graph.sites)
        for site in NEW_SITES:
            assert graph.precedes(site, "logits")
        assert graph.precedes("layers.0.attention_output", "layers.0.residual_mid")
        assert graph.precedes("layers.0.residual_mid", "layers.0.mlp_hidden")
        assert graph.precedes("layers.1.output", "final_norm")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", NEW_SITES)
def test_get_set_interchange_zero(models, family, site):
    model = models[family]
    before = hook_ids(model)
    clean = oracles.forward(model, BASE)
    source_run = oracles.forward(model, SOURCE)
    for n, sel in enumerate(selectors(site)):
        msg = lambda m, sel=sel: f"{site} {ids(sel)}: {m}"  # noqa: E731
        got = get_value(model, BASE, Site(site, **sel))
        torch.testing.assert_close(next(iter(got.values())), oracles.select(clean[site], **sel), **TOL, msg=msg)

        value = random_like(oracles.select(clean[site], **sel), n)
        got = set_value(model, {Site(site, **sel): value}, inputs=BASE).logits
        want = oracles.forward(model, BASE, {site: oracles.set_to(value, **sel)})["logits"]
        torch.testing.assert_close(got, want, **TOL, msg=msg)
        assert not torch.allclose(want, clean["logits"])

        def fn(cur):
            return torch.tanh(cur) + 0.5 * cur

        got = set_value(model, {Site(site, **sel): fn}, inputs=BASE).logits
        want = oracles.forward(model, BASE, {site: oracles.edit_at(fn, **sel)})["logits"]
        torch.testing.assert_close(got, want, **TOL, msg=msg)

        got = interchange(model, BASE, SOURCE, Site(site, **sel)).logits
        want = oracles.forward(model, BASE, {site: oracles.interchange_edit(source_run[site], sel)})["logits"]
        torch.testing.assert_close(got, want, **TOL, msg=msg)

        got = set_value(model, {Site(site, **sel): Zero()}, inputs=BASE).logits
        want = oracles.forward(model, BASE, {site: oracles.edit_at(torch.zeros_like, **sel)})["logits"]
        torch.testing.assert_close(got, want, **TOL, msg=msg)
    assert hook_ids(model) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_mid_write_reaches_the_block_output(models, family):
    """Writing residual_mid changes what the MLP reads and what the block adds the MLP output to."""
    model = models[family]
    v = random_like(torch.empty(2, 1, 16, dtype=torch.float64), 3)
    site = Site("layers.0.residual_mid", positions=[2])
    with set_value(model, {site: v}):
        got = get_value(model, BASE, ["layers.0.output", "layers.1.input"])
    want = oracles.forward(model, BASE, {site.name: oracles.set_to(v, [2])})
    torch.testing.assert_close(got["layers.0.output"], want["layers.0.output"], **TOL)
    torch.testing.assert_close(got["layers.1.input"], want["layers.1.input"], **TOL)
