"""The ground layer: errors, logging through the console script's handler, the dtype choice."""

import logging

import pytest
import torch

from llamalite import runtime
from llamalite.errors import ConfigError, LlamaliteError, did_you_mean
from llamalite.logs import setup_logging
from llamalite.runtime import resolve_dtype


def test_every_user_error_shares_one_base_and_did_you_mean_finds_the_nearest():
    assert issubclass(ConfigError, LlamaliteError) and not issubclass(LlamaliteError, ValueError)
    assert did_you_mean("chatm", ["plain", "chatml"]) == "did you mean 'chatml'?"
    assert did_you_mean("zzz", ["a", "b"]) == "choose one of a, b"
    assert did_you_mean("max_step", ["max_steps"], prefix="train.") == "did you mean 'train.max_steps'?"


def test_auto_dtype_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) == "fp32" and resolve_dtype("bf16", cpu) == "bf16"
    monkeypatch.setattr(runtime, "has_fast_bf16", lambda device: False)
    assert resolve_dtype("auto", cpu) == "fp32"
    monkeypatch.setattr(runtime, "has_fast_bf16", lambda device: True)
    assert resolve_dtype("auto", cpu) == "bf16"
    with pytest.raises(ConfigError, match="use auto, bf16 or fp32"):
        resolve_dtype("fp16", cpu)


@pytest.fixture
def console_logging():
    setup_logging()
    yield logging.getLogger("llamalite.some.module")
    llamalite_logger = logging.getLogger("llamalite")
    for handler in list(llamalite_logger.handlers):
        llamalite_logger.removeHandler(handler)
    llamalite_logger.setLevel(logging.NOTSET)


def test_info_goes_to_stdout_and_warnings_to_stderr(console_logging, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    console_logging.info("resuming from step 4")
    console_logging.warning("checkpoint step_0000006 is unusable")
    console_logging.debug("not shown at INFO")
    captured = capsys.readouterr()
    assert captured.out == "resuming from step 4\n"
    assert captured.err == "checkpoint step_0000006 is unusable\n"


def test_only_rank_zero_shows_its_lines(console_logging, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    console_logging.warning("every rank computes this")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    console_logging.warning("every rank computes this")
    assert capsys.readouterr().err == "every rank computes this\n"
