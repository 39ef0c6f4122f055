"""FSDP distillation (applications/distill/fsdp.py).

- the options and the default wrap policy (the student's block class) reach the Trainer's arguments;
  bad values are refused before anything loads;
- on the CPU accelerate does not enable FSDP: a single-process `train --fsdp full_shard` reports that
  fallback (a logged warning and summary.json's "fsdp" field) and still trains;
- the sharded path itself: torch's `fully_shard` (FSDP2) on 2 gloo CPU processes, student blocks + root
  sharded and the teacher sharded by `shard_frozen`, trained for a few steps on the project's own
  distillation losses (KD + clm + cos; and DIITO), against one unsharded process on the same global batch
  (the oracle); in the same processes the real DistillTrainer under torchrun's environment reports
  accelerate's fallback to DDP;
- the real trainer under FSDP on GPUs (skipped, with its reason, without CUDA).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch
import transformers as tf

from applications.distill.batching import BatchRecipe
from applications.distill.cli import build_parser, main
from applications.distill.config import DistillConfig
from applications.distill.corpus import make_corpus
from applications.distill.diito.step import Objectives
from applications.distill.fsdp import block_class, fsdp_report, shard_frozen
from applications.distill.methods import LMDistillation
from applications.distill.student import build_student

tf.logging.set_verbosity_error()

WORLD = 2
STEPS = 3
#: A bound, not a timing: the spawn (two fresh interpreters importing torch and transformers, ~20 s of CPU)
#: may wait long for a core on a loaded machine; a hang still ends.
TIMEOUT = 240  # under pytest-timeout's 300 s, so that this message is the one shown


def tiny_teacher(dtype=torch.float64) -> tf.GPT2LMHeadModel:
    """A seeded 3-block GPT-2 (dropout off), the same on every process."""
    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=3, n_embd=16, n_head=2, n_inner=32, vocab_size=48, n_positions=32,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                           pad_token_id=0)
    return tf.GPT2LMHeadModel(config).to(dtype)


def global_batch() -> dict:
    """4 examples of 10 tokens, no padding: a per-token mean over the global batch is the mean of the
    per-rank means, so one process on the whole batch is the oracle of 2 processes on halves."""
    ids = torch.randint(1, 48, (4, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "idx": [0, 1, 2, 3], "lengths": [10] * 4}


#: The objectives trained sharded: KD (ce) + clm + cos, whose oracle is one process on the whole batch; and
#: with DIITO, whose sources are drawn within each process's examples, so its oracle is one process on the
#: same two halves with the mean of their losses (the global batch as data parallelism defines it).
RUNS = {"kd": ({"ce": 0.5, "clm": 0.3, "cos": 0.2}, False),
        "diito": ({"ce": 0.25, "clm": 0.25, "cos": 0.25, "diito": 0.25}, True)}


def _half(batch: dict, rank: int) -> dict:
    rows = slice(rank * 2, rank * 2 + 2)
    return {k: v[rows] for k, v in batch.items()}


def _train(rank: int | None, run: str, world: int = WORLD) -> dict:
    """STEPS clipped AdamW steps of RUNS[run]; `rank` None: one unsharded process (on the whole batch, or on
    both halves for DIITO), else this rank's half with student (blocks, root) and teacher sharded. Returns
    the global losses and the full final student weights (gathered)."""
    from applications.distill.diito.step import aligned_pairs

    weights, counterfactual = RUNS[run]
    teacher = tiny_teacher()
    student = build_student(teacher, [0, 2]).train()
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    pairs = tuple(aligned_pairs("full", 2, 3)) if counterfactual else ()
    method = LMDistillation(teacher, Objectives(weights, causal=True, temperature=2.0),
                            BatchRecipe(causal=True, seed=0, pairs=pairs))
    batches = [global_batch()]
    if rank is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in student.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(student, mesh=mesh)
        shard_frozen(teacher, mesh=mesh)
        batches = [_half(batches[0], rank)]
    elif counterfactual:
        batches = [_half(batches[0], r) for r in range(world)]
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    names = ("loss", *weights)
    losses = []
    for step in range(STEPS):
        parts = [method.losses(student, b, step) for b in batches]
        (sum(p["loss"] for p in parts) / len(parts)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad()
        values = torch.stack([sum(p[k].detach() for p in parts) / len(parts) for k in names])
        if rank is not None:
            torch.distributed.all_reduce(values)
            values /= world
        losses.append(values)

    def full(state):
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}

    out = {"losses": torch.stack(losses), "student": full(student.state_dict())}
    if rank is not None:
        out["teacher_sharded"] = all(type(p).__name__ == "DTensor" and p.to_local().numel() < p.numel()
                                     for p in teacher.parameters() if p.shape[0] >= WORLD)
        out["teacher_unchanged"] = all(torch.equal(v, start[k]) for k, v in full(teacher.state_dict()).items())
        out["teacher_frozen"] = not any(p.requires_grad for p in teacher.parameters())
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One gloo process of the sharded run; rank 0 writes what it found."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    tf.logging.set_verbosity_error()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = {run: _train(rank, run) for run in RUNS}
        out["trainer"] = _trainer_under_torchrun(rank, out_dir)
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "sharded.pt"))
        torch.distributed.barrier()  # neither rank tears the group (and rank 0's store) down while the other uses it
    finally:
        torch.distributed.destroy_process_group()


def _trainer_under_torchrun(rank: int, out_dir: str) -> dict:
    """The real DistillTrainer with --fsdp in this 2-process CPU group (torchrun's environment): what its args
    hold, whether accelerate enabled FSDP, what the report and the warning say, one training step's wrapper."""
    from applications.distill.data import Collator
    from applications.distill.run import training_arguments
    from applications.distill.trainer import DistillTrainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("applications.distill").addHandler(handler)
    teacher = tiny_teacher(torch.float32)
    student = build_student(teacher, [0, 2])
    cfg = DistillConfig(output_dir=os.path.join(out_dir, "trainer"), fsdp="full_shard auto_wrap", batch_size=2,
                        max_steps=1, save_steps=100, progress=False, objectives="ce")
    ids = global_batch()["input_ids"].tolist()
    trainer = DistillTrainer(
        model=student, args=training_arguments(cfg, wrap_class=block_class(student)), data_collator=Collator(0),
        train_dataset=[{"input_ids": row, "idx": i} for i, row in enumerate(ids)],
        method=LMDistillation(teacher, Objectives({"ce": 1.0}, causal=True), BatchRecipe(causal=True, seed=0, pairs=())))
    report = fsdp_report(cfg.fsdp_options, trainer)
    trainer.train()
    return {"fsdp_config": dict(trainer.args.fsdp_config), "enabled": trainer.is_fsdp_enabled, "report": report,
            "warnings": [m for m in messages if "FSDP was requested" in m],
            "wrapper": type(trainer.model_wrapped).__name__}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fully_shard_two_gloo_processes_match_one_process(tmp_path):
    """FSDP2 on the CPU: 2 gloo ranks on halves of the batch == 1 process on the whole batch (losses, weights)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the 2 gloo processes did not finish within {TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=False)
    start = build_student(tiny_teacher(), [0, 2]).state_dict()
    for run in RUNS:
        got, reference = sharded[run], _train(None, run)
        assert got["teacher_sharded"] and got["teacher_frozen"] and got["teacher_unchanged"]
        torch.testing.assert_close(got["losses"], reference["losses"], rtol=1e-10, atol=1e-12)
        assert bool((reference["losses"] > 0).all())  # every objective is on
        assert any(not torch.equal(reference["student"][k], start[k]) for k in start)  # training moved the weights
        assert got["student"].keys() == reference["student"].keys()
        for k, v in reference["student"].items():
            torch.testing.assert_close(got["student"][k], v, rtol=1e-9, atol=1e-11)
    # the real trainer under torchrun on the CPU: the args reach it, accelerate falls back to DDP, it says so
    under = sharded["trainer"]
    assert under["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["GPT2Block"] and not under["enabled"]
    assert under["report"]["distributed_type"] == "MULTI_CPU" and under["report"]["world_size"] == WORLD
    assert "fell back to DDP" in under["report"]["why"] and under["wrapper"] == "DistributedDataParallel"
    assert len(under["warnings"]) == 1 and "NOT enabled" in under["warnings"][0]


# -- options ---------------------------------------------------------------------------------------------
def _from_cli(argv: list[str]) -> DistillConfig:
    """The DistillConfig `python -m applications.distill train ARGV` builds (cli.run_train, without training)."""
    args = build_parser().parse_args(["train", *argv])
    return DistillConfig.from_sources(args.config, **{f.name: getattr(args, f.name) for f in fields(DistillConfig)})


@pytest.mark.parametrize("flags, config", [
    (["--fsdp", "full_shard offload auto_wrap", "--fsdp-config", '{"fsdp_activation_checkpointing": true}'],
     {"reshard_after_forward": True, "cpu_offload": True, "activation_checkpointing": True}),
    (["--fsdp", "shard_grad_op auto_wrap"], {"reshard_after_forward": False}),
    (["--fsdp", "--fsdp-config", "FILE"], {"reshard_after_forward": False, "min_num_params": 0}),
])
def test_options_and_default_wrap_class_reach_the_training_arguments(tmp_path, monkeypatch, flags, config):
    """CLI flags -> DistillConfig -> training_arguments (as under torchrun): the FSDP settings, and the student's
    block class (from the site graph) as transformer_layer_cls_to_wrap; accelerate's plugin built from them
    wraps exactly the student's blocks. (The Trainer itself gets them in the gloo test below.)"""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from applications.distill import fsdp
    from applications.distill.run import training_arguments

    file = tmp_path / "fsdp.json"
    file.write_text(json.dumps({"reshard_after_forward": False, "min_num_params": 0}))
    flags = [str(file) if f == "FILE" else f for f in flags]
    cfg = _from_cli(["--teacher", "t", "--train-file", "f", "--output-dir", str(tmp_path / "out"), *flags])
    student = build_student(tiny_teacher(torch.float32), [0, 2])
    assert training_arguments(cfg, wrap_class=block_class(student)).fsdp_plugin_args is None  # one plain process
    monkeypatch.setattr(fsdp, "launched", lambda: True)
    args = training_arguments(cfg, wrap_class=block_class(student))
    assert args.fsdp is True and args.fsdp_config["transformer_layer_cls_to_wrap"] == ["GPT2Block"]
    assert {k: args.fsdp_config[k] for k in config} == config
    assert args.fsdp_plugin_args["fsdp_version"] == 2 and args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "GPT2Block"
    assert args.fsdp_plugin_args.get("cpu_offload", False) == config.get("cpu_offload", False)
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    plugin.set_auto_wrap_policy(student)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, student)  # what accelerate's FSDP2 preparation wraps
    wrapped = [name for name, m in student.named_modules() if policy(m)]
    assert wrapped == ["transformer.h.0", "transformer.h.1"]  # (the root is sharded last, as a whole)


def test_default_wrap_class_of_a_masked_lm_and_an_explicit_one(monkeypatch):
    """BERT has no _no_split_modules: the site graph's block class is used; a class given in fsdp_config wins."""
    from applications.distill import fsdp

    monkeypatch.setattr(fsdp, "launched", lambda: True)
    bert = tf.BertForMaskedLM(tf.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=24, max_position_embeddings=32))
    assert block_class(bert) == "BertLayer"
    options = DistillConfig(fsdp="full_shard", fsdp_config={"transformer_layer_cls_to_wrap": "A,B"}).fsdp_options
    assert options.training_arguments("BertLayer")["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["A", "B"]
    size = DistillConfig(fsdp="full_shard", fsdp_config={"auto_wrap_policy": "SIZE_BASED_WRAP"}).fsdp_options
    assert "transformer_layer_cls_to_wrap" not in size.training_arguments("BertLayer")["fsdp_config"]
    assert DistillConfig().fsdp_options.training_arguments("BertLayer") == {}


@pytest.mark.parametrize("flags, message", [
    (["--fsdp", "hybrid_shard"], "FSDP1 strategy"),
    (["--fsdp", "full_shard bogus"], "unknown fsdp (--fsdp) option 'bogus'; valid: full_shard"),
    (["--fsdp", "full_shard shard_grad_op"], "choose one"),
    (["--fsdp", "full_shard", "--fsdp-config", '{"auto_wrap_policy": "X"}'], "valid: TRANSFORMER_BASED_WRAP"),
    (["--fsdp", "full_shard", "--fsdp-config", '{"state_dict_type": "SHARDED_STATE_DICT"}'], "only FULL_STATE_DICT"),
    (["--fsdp", "full_shard", "--fsdp-config", '{"reshard": true}'], "unknown keys ['reshard']; valid keys:"),
    (["--fsdp", "full_shard", "--fsdp-config", '{"version": 1}'], "FSDP2 (version 2)"),
    (["--fsdp", "full_shard", "--fsdp-config", '{"bad json'], "cannot parse"),
    (["--fsdp", "full_shard", "--fsdp-config", "missing.json"], "neither inline JSON"),
    (["--fsdp", "full_shard", "--fsdp-config", "[1]"], "neither inline JSON"),
    (["--fsdp-config", '{"cpu_offload": true}'], "FSDP is off: add --fsdp"),
    (["--teacher-offload", "disk"], "teacher_offload (--teacher-offload) must be one of none, cpu"),
    (["--teacher-offload", "cpu", "--teacher-logits", "logits"], "with --teacher-logits there is none"),
])
def test_bad_fsdp_options_are_refused_before_anything_loads(tmp_path, capsys, flags, message):
    """A teacher path that does not exist: the option error comes first, so nothing was loaded."""
    code = main(["train", "--teacher", str(tmp_path / "no-teacher"), "--train-file", str(tmp_path / "no.txt"),
                 "--output-dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


# -- the CPU fallback, reported ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny GPT-2 teacher (no tokenizer: one is trained on the data) and a training file."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "train.txt").write_text("\n".join(make_corpus(48, seed=3)) + "\n")
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_embd=16, n_layer=3, n_head=2, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(root / "teacher")
    return root


def _train_cfg(root, out, **kw) -> DistillConfig:
    base = {"teacher": str(root / "teacher"), "train_file": str(root / "train.txt"), "output_dir": str(out),
            "student_layers": 3, "alignment": "late", "batch_size": 4, "max_steps": 3, "save_steps": 100,
            "logging_steps": 1, "progress": False, "plot": False}
    return DistillConfig(**{**base, **kw})


def test_single_process_cpu_fsdp_falls_back_and_says_so(saved, tmp_path, caplog):
    """On the CPU accelerate does not enable FSDP: the run warns, records it in summary.json, and still trains."""
    from safetensors.torch import load_file

    from applications.distill.run import train

    with caplog.at_level(logging.WARNING, logger="applications.distill"):
        summary = train(_train_cfg(saved, tmp_path / "out", fsdp="full_shard auto_wrap"))
    warned = [r.getMessage() for r in caplog.records if "FSDP was requested" in r.getMessage()]
    assert len(warned) == 1 and "NOT enabled" in warned[0] and "single process" in warned[0]
    report = json.loads((tmp_path / "out" / "summary.json").read_text())["fsdp"]
    assert report == summary["fsdp"]
    assert report["requested"] == "full_shard auto_wrap" and report["enabled"] is False
    assert report["distributed_type"] == "NO" and "single process" in report["why"]
    assert report["teacher"] == "whole, on the device"
    assert summary["global_step"] == 3
    saved_student = load_file(str(tmp_path / "out" / "model.safetensors"))  # a plain save_pretrained directory
    start = load_file(str(saved / "teacher" / "model.safetensors"))
    assert any(not torch.equal(saved_student[k], start[k]) for k in saved_student if k in start)
    tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_offloaded_teacher_trains_exactly_as_the_resident_one(saved, tmp_path):
    """--teacher-offload cpu (accelerate cpu_offload): the teacher's weights are on `meta` between forwards,
    and the student (KD, clm, cos and DIITO's record/replay through the teacher) ends exactly as with the
    teacher in memory."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from applications.distill.run import train

    teacher = tf.GPT2LMHeadModel.from_pretrained(saved / "teacher")
    seen = []

    class Where(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.append({p.device.type for p in teacher.parameters()})

    objectives = "ce,clm,cos,diito"
    resident = train(_train_cfg(saved, tmp_path / "resident", objectives=objectives))
    offloaded = train(_train_cfg(saved, tmp_path / "offloaded", objectives=objectives, teacher_offload="cpu"),
                      teacher=teacher, callbacks=[Where()])
    assert seen == [{"meta"}] * 3
    assert offloaded["fsdp"]["teacher"].startswith("offloaded to cpu") and "fsdp" not in resident
    assert offloaded["train_loss"] == pytest.approx(resident["train_loss"], rel=1e-6)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("resident", "offloaded"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


# -- the real trainer on GPUs ----------------------------------------------------------------------------------
NO_CUDA = "no CUDA device: the real trainer under FSDP needs GPUs (accelerate enables FSDP only there); run on a GPU machine"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_trainer_under_fsdp_on_gpus_matches_one_process(saved, tmp_path):
    """`torchrun --nproc_per_node N train --fsdp 'full_shard auto_wrap'` (N = 2 GPUs, or 1) really shards
    (summary: enabled, teacher sharded), saves a plain save_pretrained student, and reaches the weights of one
    unsharded process with N-fold accumulation (the same global batch); --teacher-offload cpu on one GPU too."""
    from safetensors.torch import load_file

    n = min(2, torch.cuda.device_count())
    common = ["train", "--teacher", str(saved / "teacher"), "--train-file", str(saved / "train.txt"),
              "--student-layers", "3", "--alignment", "late", "--batch-size", "4", "--max-steps", "3",
              "--save-steps", "100", "--no-progress", "--no-plot"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(*argv, torchrun=False):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] if torchrun else []
        done = subprocess.run([sys.executable, *launcher, "-m", "applications.distill", *common, *argv], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert done.returncode == 0, done.stderr[-3000:]

    run("--fsdp", "full_shard auto_wrap", "--output-dir", str(tmp_path / "fsdp"), torchrun=True)
    run("--gradient-accumulation-steps", str(n), "--output-dir", str(tmp_path / "one"))
    run("--gradient-accumulation-steps", str(n), "--teacher-offload", "cpu", "--output-dir", str(tmp_path / "offload"))
    report = json.loads((tmp_path / "fsdp" / "summary.json").read_text())["fsdp"]
    assert report["enabled"] is True and report["distributed_type"] == "FSDP" and "why" not in report
    assert report["teacher"].startswith("sharded") and report["world_size"] == n
    tf.AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")  # a plain save_pretrained directory
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    start = load_file(str(saved / "teacher" / "model.safetensors"))
    assert any(not torch.equal(one[k], start[k]) for k in one if k in start)
    for name in ("fsdp", "offload"):
        got = load_file(str(tmp_path / name / "model.safetensors"))
        assert got.keys() == one.keys()
        for k in one:
            torch.testing.assert_close(got[k], one[k], rtol=1e-4, atol=1e-5)


def test_a_wrap_class_the_student_lacks_is_refused_before_training(saved, tmp_path, capsys):
    code = main(["train", "--teacher", str(saved / "teacher"), "--train-file", str(saved / "train.txt"),
                 "--output-dir", str(tmp_path / "out"), "--student-layers", "2", "--max-steps", "1", "--fsdp",
                 "full_shard", "--fsdp-config", '{"transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}'])
    err = capsys.readouterr().err
    assert code == 2 and "['LlamaDecoderLayer'] are not modules of the student" in err and "'GPT2Block'" in err, err
    assert not (tmp_path / "out" / "model.safetensors").exists()
