"""`llamalite plan`: memory per rank from a meta model, checked against what autograd really saves and against the
peak RSS of real steps; time, disk, fixes and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalite.cli import main
from llamalite.config import load_config
from llamalite.errors import ConfigError, TrainError
from llamalite.model.llama import Llama, ModelConfig
from llamalite.model.presets import count_parameters
from llamalite.plan import (
    GIB,
    Hardware,
    activation_memory,
    count_model_parameters,
    gpu_hardware,
    head_input,
    meta_model,
    norm_saved,
    parse_gpu_memory,
    plan_run,
)
from llamalite.runtime import autocast_context
from llamalite.train.distributed import parallelize

ROOT = Path(__file__).resolve().parents[1]
DMAS = ROOT / "configs" / "dmas-1.7b.yaml"


def saved_bytes(model: Llama, tokens: torch.Tensor, dtype: str, checkpointing: str = "none") -> int:
    """Bytes of the distinct tensors autograd saves in one forward, parameters and buffers left out."""
    loss_fn, _ = parallelize(model, "none", torch.device("cpu"), dtype, checkpointing, False, "loss", 0)
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            autocast_context(torch.device("cpu"), dtype):
        loss_fn(tokens[:, :-1], tokens[:, 1:])
    return sum(seen.values())


@pytest.mark.parametrize("dtype,precision", [("fp32", "fp32"), ("bf16", "autocast")])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_saved_tensor_count_matches_autograd(dtype, precision, qk_norm):
    config = ModelConfig(vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=160,
                         max_seq_len=32, qk_norm=qk_norm)
    torch.manual_seed(0)
    batch, seq = 3, 32
    measured = saved_bytes(Llama(config), torch.randint(0, 512, (batch, seq + 1)), dtype)
    tokens = batch * seq
    blocks = activation_memory(config, batch, seq, precision, "none", 0).blocks
    # after the blocks: the final norm, the head's input and the saved log-softmax; the token ids and targets
    rest = (norm_saved(64, precision) + head_input(64, precision) + 4 * 512) * tokens + 2 * 8 * tokens
    # autocast's bf16 copies of the weights are saved too (the plan counts them apart from activations)
    weight_copies = 2 * count_model_parameters(meta_model(config)).matmul_weights if dtype == "bf16" else 0
    assert measured == pytest.approx(blocks + rest + weight_copies, rel=0.01)


def test_dmas_on_eight_h100s_reports_memory_time_and_disk(capsys):
    assert main(["plan", str(DMAS), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "1,716,144,128 parameters" in out and "ddp over 8 ranks" in out
    assert "524,288 = 8 sequences x 1024 tokens x 8 ranks x 8 accumulation steps" in out
    assert "43,500 steps, 22.81B tokens" in out
    assert "checkpoints      20.6 GB each" in out and "token shards     45.6 GB" in out


def test_fsdp_shards_parameters_gradients_and_optimizer_state():
    config = load_config(DMAS, ["train.parallel=fsdp"])
    one = plan_run(load_config(DMAS), Hardware(gpus=8))
    sharded = plan_run(config, Hardware(gpus=8))
    assert sharded.parallel == "fsdp" and sharded.precision == "bf16-params"
    for label in ("parameters (fp32)", "gradients (fp32)", "optimizer state (adamw)"):
        assert sharded.memory.parts[label] == pytest.approx(one.memory.parts[label] / 8)
    assert "DDP gradient buckets (fp32)" not in sharded.memory.parts
    assert sharded.memory.total < one.memory.total


def test_checkpointing_and_loss_chunks_cut_activations():
    config = load_config(DMAS).model
    none = activation_memory(config, 8, 1024, "autocast", "none", 0)
    selective = activation_memory(config, 8, 1024, "autocast", "selective", 0)
    block = activation_memory(config, 8, 1024, "autocast", "block", 0)
    chunked = activation_memory(config, 8, 1024, "autocast", "none", 4096)
    assert block.total < selective.total < none.total
    assert chunked.loss < none.loss / 1.5 and chunked.blocks == none.blocks


def test_a_plan_that_does_not_fit_names_the_overrides_that_would():
    plan = plan_run(load_config(DMAS, ["train.loss_chunk_tokens=0", "train.micro_batch_size=16"]), Hardware(gpus=1))
    assert not plan.fits
    (overrides, total), = plan.fixes
    assert total <= 0.9 * Hardware().memory
    fixed = plan_run(load_config(DMAS, ["train.loss_chunk_tokens=0", "train.micro_batch_size=16", *overrides.split()]),
                     Hardware(gpus=1), search_fixes=False)
    assert fixed.fits and fixed.memory.total == total


def test_muon_is_not_offered_fsdp_and_is_refused_under_it():
    with pytest.raises(ConfigError, match="optim.name=muon needs whole matrices"):
        plan_run(load_config(DMAS, ["optim.name=muon", "train.parallel=fsdp"]), Hardware(gpus=8))
    plan = plan_run(load_config(DMAS, ["optim.name=muon", "train.micro_batch_size=64"]), Hardware(gpus=8))
    assert all("fsdp" not in overrides for overrides, _ in plan.fixes)
    assert plan.memory.parts["optimizer state (muon)"] < 2 * plan.memory.parts["parameters (fp32)"]


def test_time_follows_mfu_and_gpus():
    config = load_config(DMAS)
    base = plan_run(config, Hardware(gpus=8, mfu=0.4))
    assert plan_run(config, Hardware(gpus=8, mfu=0.2)).total_seconds == pytest.approx(2 * base.total_seconds)
    four = plan_run(load_config(DMAS, ["train.batch_tokens=262144"]), Hardware(gpus=4, mfu=0.4))
    assert four.step_seconds == pytest.approx(base.step_seconds)


@pytest.mark.parametrize("args,message", [
    (["--gpu", "h300"], "unknown --gpu 'h300'"),
    (["--gpu-memory", "lots"], "--gpu-memory 'lots' is not a memory size"),
    (["train.batch_tokens=1000"], "train.batch_tokens=1000 is not a multiple"),
    (["train.activation_checkpointing=some"], "unknown train.activation_checkpointing 'some'"),
])
def test_bad_input_is_one_line(args, message, capsys):
    assert main(["plan", str(DMAS), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("args,message", [
    (["--gpus", "0"], "argument --gpus: '0' is out of range"),
    (["--mfu", "45"], "argument --mfu: '45' is out of range: must be a number in (0, 1]"),
])
def test_out_of_range_options_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["plan", str(DMAS), *args])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_overrides_may_follow_the_options(capsys):
    assert main(["plan", str(DMAS), "--gpus", "8", "train.micro_batch_size=4"]) == 0
    assert "4 sequences x 1024 tokens x 8 ranks x 16 accumulation steps" in capsys.readouterr().out


def test_gpu_memory_units_and_gpu_table():
    assert parse_gpu_memory("80GB") == parse_gpu_memory("80GiB") == 80 * GIB
    assert parse_gpu_memory("512m") == 512 * 2**20
    a6000 = gpu_hardware("a6000", 4, None, None, 0.4)
    assert a6000.memory == 49_140 * 2**20 and a6000.peak_flops == pytest.approx(154.8e12)
    assert gpu_hardware("h100", 8, "40GB", 5e14, 0.3).memory == 40 * GIB
    with pytest.raises(ConfigError, match="train.batch_tokens=524288 is not a multiple"):  # refused at load
        load_config(DMAS, ["train.micro_batch_size=3"])
    with pytest.raises(TrainError):  # the world size's part, known when the run is planned
        plan_run(load_config(DMAS, ["train.batch_tokens=3145728"]), Hardware(gpus=7))


def test_vocab_left_to_the_tokenizer_is_padded():
    config = load_config(None, ["model.preset=tiny", "model.vocab_size=null", "tokenizer.vocab_size=1000",
                                "train.batch_tokens=2048", "train.micro_batch_size=8"])
    plan = plan_run(config, Hardware(gpus=1))
    assert plan.model_cfg.vocab_size == 1024
    assert plan.counts.total == count_parameters(dataclasses.replace(config.model, vocab_size=1024))


def test_estimate_is_within_a_quarter_of_a_real_steps_peak_rss(tmp_path):
    """benchmarks/plan_memory.py on the tiny preset: real steps in a fresh process, live-memory allocator setting."""
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_memory.py"), "--cases", "tiny",
                    "--allocators", "live", "--json", str(out)], check=True, capture_output=True)
    row, = json.loads(out.read_text())
    assert 0.75 <= row["ratio_live"] <= 1.25


def test_cli_takes_the_vocab_of_the_prepared_tokenizer(corpus_dir, prepared_dir, tmp_path, capsys):
    """model.vocab_size: null is the prepared tokenizer's size, padded, as training will make it."""
    from llamalite.config import save_config
    from llamalite.tokenizer import Tokenizer
    from tests.conftest import small_config

    config = small_config(corpus_dir, prepared_dir, tmp_path / "run", batch_tokens=64, micro_batch_size=4)
    config.tokenizer.vocab_size = 1000  # what a BPE would be trained to: the plan must read the prepared one instead
    save_config(config, tmp_path / "config.yaml")
    assert main(["plan", str(tmp_path / "config.yaml")]) == 0
    padded = Tokenizer.load(prepared_dir / "tokenizer.json").padded_vocab_size(config.tokenizer.pad_vocab_multiple)
    assert padded != math.ceil(config.tokenizer.vocab_size / config.tokenizer.pad_vocab_multiple) * \
        config.tokenizer.pad_vocab_multiple  # else the test could not tell the two apart
    assert f"vocab {padded})" in capsys.readouterr().out
