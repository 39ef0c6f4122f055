"""A model's site graph lives on the model: using the toolkit never keeps a model alive."""

from __future__ import annotations

import copy
import gc
import io
import weakref

import torch
from conftest import build, tokens

import interventions as iv


def test_a_model_used_with_the_toolkit_is_freed_when_dropped():
    model = build("gpt2")
    iv.get_value(model, tokens(1, 4, seed=0), "layers.1.output")
    graph = weakref.ref(iv.SiteGraph.from_model(model))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None and graph() is None  # the bug: a process-wide cache kept both forever


def test_the_graph_is_cached_and_copies_rebuild_their_own():
    model = build("llama")
    graph = iv.SiteGraph.from_model(model)
    assert iv.SiteGraph.from_model(model) is graph
    assert "_interventions_site_graph" not in model.state_dict()
    twin = copy.deepcopy(model)
    other = iv.SiteGraph.from_model(twin)
    assert other is not graph and other.model is twin
    x = tokens(1, 5, seed=1)
    with iv.set_value(twin, {"layers.0.output": iv.Zero()}):  # hooks land on the copy's modules
        zeroed = twin(x).logits
    torch.testing.assert_close(model(x).logits, twin(x).logits, rtol=0, atol=0)
    assert not torch.allclose(zeroed, model(x).logits)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a pickled model does not carry its graph
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.__dict__.get("_interventions_site_graph") is None
    assert iv.SiteGraph.from_model(loaded).model is loaded
