"""A site's index tensors are built once per (shape, device, layout), not at every hook firing."""

from __future__ import annotations

import torch
from conftest import tokens

import interventions as iv
from interventions.sites import Site


def test_index_is_built_once_across_forwards(gpt2, monkeypatch):
    builds = []
    real = Site._build_index
    monkeypatch.setattr(Site, "_build_index", lambda self, *a: builds.append(self.name) or real(self, *a))
    site = iv.Site("layers.1.output", positions=[0, 2], dims=[1, 3])
    x = tokens(2, 5, seed=0)
    with iv.set_value(gpt2, {site: iv.Zero()}):
        first = gpt2(x).logits
        for _ in range(3):  # the bug: an index rebuilt at each of these forwards
            torch.testing.assert_close(gpt2(x).logits, first, rtol=0, atol=0)
    assert builds == ["layers.1.output"]
    # a new shape builds a new index, and the values it selects are still right
    y = tokens(3, 6, seed=1)
    got = iv.get_value(gpt2, y, site)[site]
    full = iv.get_value(gpt2, y, "layers.1.output")["layers.1.output"]
    torch.testing.assert_close(got, full[:, [0, 2]][:, :, [1, 3]], rtol=0, atol=0)
    assert builds == ["layers.1.output", "layers.1.output"]
