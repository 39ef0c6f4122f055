"""The DAS hierarchical-equality example: its causal model and sampler, and the direction of its result."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "hierarchical_equality.py"


def load_example():
    spec = importlib.util.spec_from_file_location("hierarchical_equality_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_causal_model_and_balanced_sampler():
    he = load_example()
    pool = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    cm = he.hierarchical_equality(pool)
    inputs = cm.sample_inputs(4000, torch.Generator().manual_seed(1))
    w, x, y, z = (inputs[k] for k in "WXYZ")
    wx = (w == x).all(-1)
    yz = (y == z).all(-1)
    # Entities come from the pool; W, X, Y, Z of one row are distinct entities unless equal by design.
    assert all(bool((v[:, None, :] == pool[None]).all(-1).any(-1).all()) for v in (w, x, y, z))
    assert not bool(((w == y).all(-1) | (w == z).all(-1) | (x == y).all(-1) | (x == z).all(-1)).any())
    # The four patterns (≠,≠) (=,=) (=,≠) (≠,=) are balanced, so the label is balanced too.
    for a in (False, True):
        for b in (False, True):
            share = float(((wx == a) & (yz == b)).float().mean())
            assert abs(share - 0.25) < 0.03
    out = cm.run(inputs)
    assert torch.equal(out["O"], wx == yz)


def test_quick_run_reproduces_the_direction_of_the_result():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--seed", "0"], capture_output=True, text=True, check=False,
                          timeout=300, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("seed=0")  # seeds are printed
    result = json.loads(lines[-1])
    assert {"task_accuracy", "iia_das", "iia_localist", "iia_iit"} <= set(result)
    assert result["task_accuracy"] >= 0.9
    assert result["iia_das"] > result["iia_localist"] + 0.05
    assert result["iia_iit"] > result["iia_localist"] + 0.05
    assert result["iia_iit"] >= 0.9
    # DAS is as good on the training entities as on held-out ones: its gap is the layer, not generalisation.
    assert result["hidden"] == 16 and result["recipe"] == "sgd"  # the default recipe
    assert abs(result["iia_das"] - result["iia_das_training_entities"]) < 0.05


def test_hidden_width_must_be_even():
    he = load_example()
    for bad in ("7", "0"):
        with pytest.raises(SystemExit) as exc:
            he.main(["--hidden", bad])
        assert exc.value.code == 2
    net = he.make_mlp(0, hidden=32)
    assert net.hidden1[0].weight.shape == (32, 16) and net.out.weight.shape == (2, 32)


def test_dropout_sits_after_the_site_and_only_in_training():
    he = load_example()
    net = he.make_mlp(0, dropout=0.2)
    assert list(dict(net.named_children())) == ["hidden1", "dropout1", "hidden2", "hidden3", "out"]
    plain = he.make_mlp(0)  # same seed, same weights: dropout adds no parameters
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    net.eval()
    assert torch.equal(net(x), plain(x))
    net.train()
    assert not torch.equal(net(x), plain(x))
    with pytest.raises(SystemExit):
        he.main(["--recipe", "rmsprop"])
