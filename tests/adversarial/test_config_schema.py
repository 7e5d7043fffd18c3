"""Issue 28, property 3: every config key and every numeric command-line option is checked against its declared
type and range before anything runs; a bad value is a one-line error (or argparse's usage error), never a traceback,
never silently accepted, and nothing is written.

The keys are found by walking the config dataclasses, so a key added later is tried too (and must declare a range).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llamalite.cli import build_parser
from llamalite.config import Config, load_config, with_overrides
from llamalite.errors import ConfigError, LlamaliteError
from llamalite.schema import DuplicateKeyError, declared_range, load_yaml
from tests.adversarial.conftest import assert_clean_outcome, run_main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "llamalite" / "configs" / "demo.yaml"
SHIPPED_CONFIGS = sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "llamalite" / "configs").glob("*.yaml")])
FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

# What a careless user, a script with an unset variable, or a fuzzer types after `key=`.
HOSTILE_VALUES = [
    "0", "-1", "-0.5", "0.0", "1.5", "2", "3", ".nan", "nan", "NaN", ".inf", "-.inf", "inf", "1e400", "-1e400",
    "2**64", "2**100000", "-8**0.5", "0**-1", "99999999999999999999999", "1e-400", "''", '""', "[]", "{}",
    "[1, 2]", "[0.9, 1.5]", "{a: 1}", "true", "false", "null", "~", "abc", "[1", "{a", "'", "!!binary aGk=",
    "2020-01-01", "cuda:x", "0x10", "1_000", "  ", "=", "[[[[[[[[[[1]]]]]]]]]]", "&a [*a]",
]


def _unwrap(hint):
    """The non-None type of an Optional hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def config_keys(cls=Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, object]]:
    """(dotted override path, field, type) of every leaf key, list items and dict entries included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = _unwrap(hints[f.name])
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            keys += config_keys(hint, f"{prefix}{f.name}.")
        elif origin is list and dataclasses.is_dataclass(args[0]):  # data.sources: the demo has one source
            keys += config_keys(args[0], f"{prefix}{f.name}.0.")
        elif origin is dict and dataclasses.is_dataclass(args[1]):  # sft.templates: a new template named t
            keys += config_keys(args[1], f"{prefix}{f.name}.t.")
        else:
            keys.append((f"{prefix}{f.name}", f, hint))
    return keys


KEYS = config_keys()
KEY_NAMES = [name for name, _, _ in KEYS]


def _is_numeric(hint) -> bool:
    return hint in (int, float) or (typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float))


def _where(tmp: Path) -> list[str]:
    """Overrides pointing everything a command could write into `tmp`."""
    return [f"data.out_dir={tmp / 'data'}", f"train.run_dir={tmp / 'run'}"]


def load_or_config_error(overrides: list[str], base: Config | None = None) -> Config | None:
    """load_config's outcome (with_overrides' when given a base config): the config, or None after a one-line
    ConfigError. Any other exception fails the test."""
    try:
        config = load_config(DEMO, overrides) if base is None else with_overrides(base, overrides)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message
        return None
    assert_within_declared_ranges(config)
    return config


def assert_within_declared_ranges(node, prefix: str = "") -> None:
    """An accepted config holds no value outside its key's declared range (so no zero, NaN or inf got through)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            assert_within_declared_ranges(value, f"{prefix}{f.name}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for item in value:
                assert_within_declared_ranges(item, f"{prefix}{f.name}[].")
        elif isinstance(value, dict):
            for item in value.values():
                if dataclasses.is_dataclass(item):
                    assert_within_declared_ranges(item, f"{prefix}{f.name}{{}}.")
        else:
            declared = declared_range(f.metadata)
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, float):
                    assert math.isfinite(item), f"{prefix}{f.name}={item}"
                if declared is not None:
                    assert declared.problem(item) is None, f"{prefix}{f.name}={item!r} got through"


# -- the schema itself -------------------------------------------------------------------------------------------


def test_every_numeric_key_declares_its_range():
    undeclared = [name for name, f, hint in KEYS if _is_numeric(hint) and declared_range(f.metadata) is None]
    assert not undeclared, f"numeric keys without a declared range: {undeclared}"


def test_the_choices_checked_at_load_are_those_the_code_acts_on():
    from llamalite import config as cfg
    from llamalite.data.sft import FORMATS, TRUNCATIONS
    from llamalite.data.sources import SOURCE_TYPES
    from llamalite.runtime import DTYPES
    from llamalite.train.distributed import CHECKPOINTING_MODES, COMPILE_SCOPES, PARALLEL_MODES
    from llamalite.train.optim import OPTIMIZERS, SCHEDULE_CHANGES, SCHEDULES
    from llamalite.train.trackers import WANDB_MODES

    pairs = [(cfg.SOURCE_TYPES, SOURCE_TYPES), (cfg.OPTIMIZERS, OPTIMIZERS), (cfg.SCHEDULES, SCHEDULES),
             (cfg.SCHEDULE_CHANGES, SCHEDULE_CHANGES), (cfg.PARALLEL_MODES, PARALLEL_MODES),
             (cfg.CHECKPOINTING_MODES, CHECKPOINTING_MODES), (cfg.COMPILE_SCOPES, COMPILE_SCOPES),
             (cfg.WANDB_MODES, WANDB_MODES), (cfg.SFT_FORMATS, FORMATS), (cfg.TRUNCATIONS, TRUNCATIONS)]
    for declared, acted_on in pairs:
        assert set(declared) == set(acted_on)
    assert set(cfg.TRAIN_DTYPES) == set(DTYPES)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    load_config(path)


def test_defaults_and_every_preset_pass_the_schema():
    from llamalite.model.presets import PRESETS

    load_config(None)
    for name in PRESETS:
        load_config(None, [f"model.preset={name}", "train.seq_len=null"])


def test_every_key_with_every_hostile_value(tmp_path):
    """The exhaustive sweep: each key x each hostile value -> a valid config or a one-line ConfigError."""
    base = load_config(DEMO, _where(tmp_path))
    accepted = refused = 0
    for name in KEY_NAMES:
        for value in HOSTILE_VALUES:
            config = load_or_config_error([f"{name}={value}"], base)
            accepted, refused = accepted + (config is not None), refused + (config is None)
    assert refused > accepted > 0
    assert not any(tmp_path.iterdir()), "loading a config wrote a file"


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURES)
@given(name=st.sampled_from(KEY_NAMES),
       value=st.one_of(st.sampled_from(HOSTILE_VALUES), st.text(max_size=12), st.integers().map(str),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.lists(st.integers(-2, 2), max_size=3).map(str)))
def test_drawn_values_for_drawn_keys(name, value):
    load_or_config_error([f"{name}={value}"])


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(overrides=st.lists(st.tuples(st.sampled_from(KEY_NAMES), st.sampled_from(HOSTILE_VALUES)), min_size=2,
                          max_size=4))
def test_several_drawn_overrides_at_once(overrides):
    load_or_config_error([f"{name}={value}" for name, value in overrides])


@pytest.mark.parametrize("override,message", [
    ("train.micro_batch_size=0", "train.micro_batch_size=0 is out of range: must be an integer in (0, 2**24], "
                                 "e.g. train.micro_batch_size=8"),
    ("train.max_steps=[1", "override 'train.max_steps=[1': the value is not valid YAML"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("optim.schedule=cosin", "unknown optim.schedule 'cosin': did you mean 'cosine'?"),
    ("optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0] is out of range: must be a number in [0, 1)"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must hold two numbers"),
    ("optim.min_lr=0.1", "optim.min_lr=0.1 lies outside [0, optim.lr=0.002]"),
    ("model.n_kv_head=3", "n_head 8 is not a multiple of n_kv_head 3"),
    ("train.batch_tokens=4000", "train.batch_tokens=4000 is not a multiple of train.micro_batch_size x "
                                "train.seq_len = 4096"),
    ("model.vocab_size=2**30", "model.vocab_size=1073741824 is out of range"),
    ("train.device=gpu", "train.device='gpu' must be a string of the form auto, cpu, cuda or cuda:N"),
    ("data.sources.0.sample_docs=5", "data.sources[0].sample_docs needs a parquet source"),
    ("train.val_batches=0", "train.val_batches=0 leaves nothing to evaluate every train.eval_interval=30 steps"),
    ("name=../elsewhere", "name='../elsewhere' makes the run directory runs/../elsewhere"),
    ("name=", "name must be a string, got None"),
])
def test_messages_name_key_value_range_and_fix(override, message):
    with pytest.raises(ConfigError) as refused:
        load_config(DEMO, [override])
    assert message in str(refused.value) and "\n" not in str(refused.value)


# -- duplicate keys ----------------------------------------------------------------------------------------------


def test_a_repeated_section_names_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\noptim:\n  lr: 1.0e-3\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid YAML: key 'train' appears twice in one mapping, "
                                          r"at line 1 and line 5"):
        load_config(path)
    path.write_text("train:\n  max_steps: 5\n  seed: 2\n  max_steps: 6\n")
    with pytest.raises(ConfigError, match="key 'max_steps' appears twice in one mapping, at line 2 and line 4"):
        load_config(path)
    with pytest.raises(ConfigError, match="key 'a' appears twice"):
        load_config(DEMO, ["sft.templates={a: {}, a: {}}"])


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURES)
@given(config=st.sampled_from(SHIPPED_CONFIGS), where=st.floats(0, 1, exclude_max=True))
def test_any_key_line_repeated_in_a_shipped_config_is_refused(config, where, tmp_path_factory):
    """Copy any `key:` line of a shipped config right below itself (same mapping): refused, both lines named."""
    lines = config.read_text().splitlines()
    key_lines = [i for i, line in enumerate(lines)
                 if line.strip() and not line.lstrip().startswith(("#", "-")) and ":" in line and
                 not line.rstrip().endswith(":")]
    index = key_lines[int(where * len(key_lines))]
    mutated = [*lines[:index + 1], lines[index], *lines[index + 1:]]
    path = tmp_path_factory.mktemp("dup") / "c.yaml"
    path.write_text("\n".join(mutated) + "\n")
    with pytest.raises(ConfigError, match=rf"appears twice in one mapping, at line {index + 1} and line {index + 2}"):
        load_config(path)


def test_the_unique_key_loader_is_a_safe_loader():
    assert load_yaml("a: 1\nb: [1, 2]\n<<: {c: 3}\n") == {"a": 1, "b": [1, 2], "c": 3}
    with pytest.raises(yaml.YAMLError):
        load_yaml("!!python/object/apply:os.system ['true']")
    with pytest.raises(DuplicateKeyError):
        load_yaml("a: {b: 1, b: 2}")


def test_the_packaged_chat_templates_load_with_the_same_loader():
    from llamalite.data.sft import builtin_templates

    assert {"vicuna_v1.1", "chatml", "plain"} <= set(builtin_templates())


# -- the commands ------------------------------------------------------------------------------------------------


def _paths(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURES)
@given(name=st.sampled_from(KEY_NAMES), value=st.sampled_from(HOSTILE_VALUES))
def test_plan_with_a_drawn_override(capsys, tmp_path_factory, name, value):
    """`plan` is the cheap valid path: exit 0 with a plan, or one clean error line; it writes nothing."""
    tmp = tmp_path_factory.mktemp("plan")
    outcome = run_main(capsys, ["plan", DEMO, *_where(tmp), f"{name}={value}"])
    assert_clean_outcome(outcome)
    assert not _paths(tmp)


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURES)
@given(command=st.sampled_from(["train", "prepare", "sft"]), name=st.sampled_from(KEY_NAMES),
       value=st.sampled_from(HOSTILE_VALUES))
def test_train_prepare_sft_refuse_an_invalid_value_before_writing(capsys, tmp_path_factory, command, name, value):
    """Only values load_config refuses are tried (valid ones would start real work): the command fails with one
    line and leaves its output folders untouched."""
    tmp = tmp_path_factory.mktemp(command)
    override = f"{name}={value}"
    assume(load_or_config_error([*_where(tmp), override]) is None)
    cwd = os.getcwd()
    os.chdir(tmp)  # a relative default (runs/<name>, data/prepared) would land here
    try:
        outcome = run_main(capsys, [command, DEMO, *_where(tmp), override])
    finally:
        os.chdir(cwd)
    assert_clean_outcome(outcome, allow_success=False)
    assert not _paths(tmp), f"{command} wrote {sorted(_paths(tmp))} before refusing {override}"


def numeric_options() -> list[tuple[str, str]]:
    """(command, option) of every option of every command whose argparse type is not a plain string."""
    parser = build_parser()
    found = []
    for action in parser._subparsers._group_actions:  # noqa: SLF001 (argparse has no public walk)
        for command, sub in action.choices.items():
            for option in sub._actions:  # noqa: SLF001
                if option.option_strings and option.type not in (None, str):
                    found.append((command, option.option_strings[-1]))
    return found


NUMERIC_OPTIONS = numeric_options()
STRING_SIZE_OPTIONS = [("export", "--shard-size"), ("plan", "--gpu-memory")]


def _argv(command: str, option: str, value: str, tmp: Path) -> list[str]:
    nothing = str(tmp / "no-such-checkpoint")
    base = {
        "generate": ["generate", nothing, "--prompt", "hi"],
        "chat": ["chat", nothing],
        "eval": ["eval", nothing, "--val-only"],
        "plan": ["plan", str(DEMO), *_where(tmp)],
        "model-info": ["model-info", "tiny"],
        "export": ["export", nothing, str(tmp / "out")],
    }[command]
    return [*base, f"{option}={value}"]


def test_every_numeric_option_is_range_checked():
    expected = {("model-info", "--seq-len"), ("plan", "--gpus"), ("plan", "--gpu-flops"), ("plan", "--mfu"),
                ("eval", "--limit"), ("eval", "--batch-size"), ("generate", "--max-new-tokens"),
                ("generate", "--temperature"), ("generate", "--top-k"), ("generate", "--top-p"),
                ("generate", "--seed"), ("generate", "--threads")}
    assert expected <= set(NUMERIC_OPTIONS)
    for command, option in NUMERIC_OPTIONS:
        sub = build_parser()._subparsers._group_actions[0].choices[command]  # noqa: SLF001
        action = next(a for a in sub._actions if option in a.option_strings)  # noqa: SLF001
        if action.type in (int, float):
            pytest.fail(f"llamalite {command} {option} reads a bare {action.type.__name__}: declare its range")


@settings(max_examples=120, deadline=None, suppress_health_check=FIXTURES)
@given(target=st.sampled_from(NUMERIC_OPTIONS + STRING_SIZE_OPTIONS),
       value=st.one_of(st.sampled_from(HOSTILE_VALUES), st.text(max_size=10),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str)))
def test_drawn_option_values(capsys, tmp_path_factory, target, value):
    """Exit 0, a clean one-line error (exit 2), or argparse's usage error (SystemExit 2): never a traceback."""
    command, option = target
    tmp = tmp_path_factory.mktemp("option")
    try:
        outcome = run_main(capsys, _argv(command, option, value, tmp))
    except SystemExit as exited:
        err = capsys.readouterr().err
        assert exited.code == 2 and f"llamalite {command}: error: argument" in err and "Traceback" not in err, err
        return
    assert_clean_outcome(outcome)


@pytest.mark.parametrize("text", ["", "x", "nan", "inf", "-1GB", "0GB", "1e3GB", "9" * 400 + "GB", "80 GB", "5 TB",
                                  "\x00", "GB", "1.5.5GB", "0.0000001B"])
def test_size_parsers_never_traceback(text):
    from llamalite.export.hf import parse_size
    from llamalite.plan import parse_gpu_memory

    for parse in (parse_size, parse_gpu_memory):
        try:
            size = parse(text)
        except LlamaliteError as exc:
            assert "\n" not in str(exc)
        else:
            assert 0 < size < 2**63


@pytest.mark.parametrize("bad", [dict(temperature=math.nan), dict(temperature=math.inf), dict(top_p=math.nan),
                                 dict(top_k=-1), dict(max_new_tokens=1.5), dict(max_new_tokens=True),
                                 dict(top_p=0.0), dict(temperature="hot")])
def test_sampling_options_refuse_what_the_cli_would(bad):
    from llamalite.generate import SamplingOptions

    with pytest.raises(ConfigError):
        SamplingOptions(**bad).validate()


@pytest.mark.parametrize("args", [dict(gpus=0), dict(mfu=math.nan), dict(flops=math.nan), dict(flops=math.inf),
                                  dict(flops=-1.0), dict(gpu="h300"), dict(memory="lots")])
def test_gpu_hardware_refuses_what_the_cli_would(args):
    from llamalite.plan import gpu_hardware

    settings_ = dict(gpu="h100", gpus=1, memory=None, flops=None, mfu=0.4) | args
    with pytest.raises(ConfigError):
        gpu_hardware(**settings_)


# -- merge keys, costly small values, devices, process groups ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.sampled_from(["<<", "max_steps", "seed", "run_dir"]), min_size=2, max_size=6),
       nested=st.booleans())
def test_a_repeated_merge_key_is_refused_like_any_key(keys, nested):
    """`<<` drawn among plain keys: the first repeat (merge key or not) is refused naming both lines; a mapping
    without one loads (several mappings merge as one `<<: [...]`)."""
    indent = "  " if nested else ""
    lines = ["train:"] if nested else []
    for key in keys:
        value = "{max_steps: 3, run_dir: run}" if key == "<<" else "1"
        lines.append(f"{indent}{key}: {value}")
    text = "\n".join(lines) + "\n"
    first_line = {}
    repeat = None
    for index, key in enumerate(keys):
        line = index + 1 + nested
        if key in first_line:
            repeat = (key, first_line[key], line)
            break
        first_line[key] = line
    if repeat is None:
        assert isinstance(load_yaml(text), dict)
        return
    with pytest.raises(DuplicateKeyError, match=rf"key '{repeat[0]}' appears twice in one mapping, at line "
                                                rf"{repeat[1]} and line {repeat[2]}"):
        load_yaml(text)


def test_the_issues_repeated_merge_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  <<: {max_steps: 3, run_dir: run}\n  <<: {max_steps: 5}\n")
    with pytest.raises(ConfigError, match="key '<<' appears twice in one mapping, at line 2 and line 3"):
        load_config(path)
    path.write_text("a: &a {max_steps: 3}\nb: &b {seed: 4}\ntrain:\n  <<: [*a, *b]\n  '<<': 1\n")
    assert load_yaml(path.read_text())["train"] == {"max_steps": 3, "seed": 4, "<<": 1}


@settings(max_examples=30, deadline=None)
@given(shard_tokens=st.integers(-5, 255))
def test_a_shard_too_small_to_be_worth_a_file_is_refused(shard_tokens):
    """data.shard_tokens=1 made prepare write a file, a checksum and a progress record (listing every shard) per
    token: its declared range starts at MIN_SHARD_TOKENS."""
    from llamalite.config import MIN_SHARD_TOKENS

    with pytest.raises(ConfigError, match=r"data.shard_tokens=.* must be an integer in \[256, 2\*\*50\]"):
        load_config(DEMO, [f"data.shard_tokens={shard_tokens}"])
    assert load_config(DEMO, [f"data.shard_tokens={MIN_SHARD_TOKENS}"]).data.shard_tokens == MIN_SHARD_TOKENS


device_names = st.one_of(
    st.sampled_from(["mps", "cuda", "cuda:0", "cuda:1", "cuda:7", "cuda:99999999999", "xpu", "xpu:0", "meta",
                     "cpu:1", "hip", "vulkan", "mkldnn", "", "cuda:", "cuda:-1", "CPU"]),
    st.from_regex(r"(cpu|cuda|mps|xpu|meta|hpu|mtia)(:\d{1,3})?", fullmatch=True),
    st.text(max_size=8))


@settings(max_examples=80, deadline=None)
@given(name=device_names)
def test_any_device_name_is_usable_or_one_line(name):
    """runtime.resolve_device, which train, sft and eval all go through: a device this torch can use, or one
    ConfigError line naming the devices that are there (torch's own 'not linked with support for mps' traceback
    came later, at the first tensor)."""
    import torch

    from llamalite.runtime import available_devices, resolve_device

    try:
        device = resolve_device(name)
    except ConfigError as exc:
        assert "\n" not in str(exc) and "use auto or one of cpu" in str(exc)
        return
    assert str(device) in available_devices()
    torch.zeros(1, device=device)  # really usable


@settings(max_examples=12, deadline=None, suppress_health_check=FIXTURES)
@given(name=st.sampled_from(["mps", "cuda:99", "cuda:7"]) | st.from_regex(r"cuda(:\d{1,2})?", fullmatch=True))
def test_train_on_a_device_that_is_not_there_is_one_line_and_writes_nothing(capsys, tmp_path_factory, name):
    from llamalite.runtime import available_devices

    assume(name not in available_devices())
    tmp = tmp_path_factory.mktemp("device")
    outcome = run_main(capsys, ["train", DEMO, *_where(tmp), f"train.device={name}"])
    assert_clean_outcome(outcome, allow_success=False)
    assert "use auto or one of cpu" in outcome.err
    assert not _paths(tmp)


@pytest.fixture(scope="module")
def base_run(corpus_dir, prepared_dir, tmp_path_factory) -> Path:
    """A two-layer model trained for a few steps: sft's base."""
    from llamalite.train.trainer import Trainer
    from tests.conftest import small_config

    run = tmp_path_factory.mktemp("base") / "run"
    Trainer(small_config(corpus_dir, prepared_dir, run)).fit()
    return run


@pytest.mark.parametrize("command", ["train", "sft"])
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ddp_or_fsdp_without_torchrun_is_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch, command, parallel,
                                                                    request):
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    config = DEMO
    if command == "sft":  # a config of sft's own: the base checkpoint brings the model
        config = tmp_path / "sft.yaml"
        config.write_text(f"sft:\n  base: {request.getfixturevalue('base_run')}\n")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    outcome = run_main(capsys, [command, config, *_where(out), f"train.parallel={parallel}", "train.device=cpu"])
    assert_clean_outcome(outcome, allow_success=False)
    assert f"torchrun --nproc_per_node N -m llamalite {command} CONFIG" in outcome.err
    assert not _paths(out)
