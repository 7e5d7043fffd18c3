"""Issue 28, item 2: one output policy for every command that writes (llamalite/files.py, claim_output).

The table runs every writing command against every state its output path can be in (absent, empty, its own earlier
output, a user's files with and without the opt-in, a file, a read-only folder, its own input or inside it, inside a
checkpoint or a run directory, another llamalite artifact even with the opt-in) and asserts the exit (0, or 2 with
one line), that every file that existed before is byte-identical after, and that a refusal created nothing at all
(no folder, no .lock, no temporary). A hypothesis test tries the policy function itself over generated folder states.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamalite.checkpoint.format import list_checkpoints, load_checkpoint, load_model_tensors
from llamalite.checkpoint.sharded import save_sharded_checkpoint
from llamalite.config import Config, config_from_dict, save_config
from llamalite.errors import ConfigError
from llamalite.export.hf import export_checkpoint
from llamalite.files import OUTPUT_MARKER, artifact_kind, claim_output
from llamalite.model.llama import Llama
from llamalite.train.optim import build_optimizer
from llamalite.train.trainer import Trainer
from tests.adversarial.conftest import (
    assert_clean_outcome,
    assert_untouched,
    fails_after,
    run_main,
    tree_snapshot,
)
from tests.conftest import SHARED_DATA, small_config


# ================================================================================================= artefacts
@dataclass
class Artefacts:
    corpus: Path  # the text sources of prepare
    prepared: Path  # prepared data
    run: Path  # a trained run directory (one checkpoint)
    checkpoint: Path  # its checkpoint
    sharded: Path  # the same checkpoint written by DCP (what consolidate reads)
    hf: Path  # the transformers export of the checkpoint
    lora_run: Path  # an SFT run with LoRA adapters (what merge --adapter-out reads)
    sft_data: Path


def sft_config(base: Path, data: Path, run_dir: Path, method: str) -> Config:
    config = Config(name="sft")
    config.sft.base, config.sft.data, config.sft.method, config.sft.template = str(base), str(data), method, "plain"
    config.sft.lora.r, config.sft.lora.alpha = 2, 4.0
    for key, value in dict(run_dir=str(run_dir), dtype="fp32", batch_tokens=64, micro_batch_size=4, seq_len=16,
                           max_steps=1, eval_interval=0, progress=False).items():
        setattr(config.train, key, value)
    return config


@pytest.fixture(scope="module")
def artefacts(corpus_dir, prepared_dir, tmp_path_factory) -> Artefacts:
    from llamalite.sft import SFTTrainer

    root = tmp_path_factory.mktemp("policy")
    run = root / "run"
    config = small_config(corpus_dir, prepared_dir, run, max_steps=1, eval_interval=0, keep_checkpoints=1)
    config.model.max_seq_len = 512  # room for a benchmark's documents (eval --output-json)
    Trainer(config).fit()
    checkpoint = list_checkpoints(run / "checkpoints")[-1]

    loaded = load_checkpoint(checkpoint)
    config = config_from_dict(loaded.state["config"])
    model = Llama(config.model)
    load_model_tensors(model, loaded.model)
    optimizer = build_optimizer(model, config.optim, "cpu")
    optimizer.load_state_dict(loaded.optimizer)
    sharded = save_sharded_checkpoint(root / "sharded_run" / "checkpoints", loaded.step, model, optimizer,
                                      loaded.state)
    hf = export_checkpoint(checkpoint, root / "hf")

    sft_data = root / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n" for i in range(40)))
    lora_run = root / "lora_run"
    SFTTrainer(sft_config(checkpoint, sft_data, lora_run, "lora")).fit()
    return Artefacts(corpus_dir, prepared_dir, run, checkpoint, sharded, hf, lora_run, sft_data)


# ================================================================================================= commands
@dataclass(frozen=True)
class Command:
    """One writing command: how to call it with its output at `out`, its inputs copied into the case's folder."""

    name: str
    inputs: Callable[[Artefacts, Path], dict[str, Path]]  # copies of what it reads, under the case's folder
    argv: Callable[[dict[str, Path], Path], list]  # (inputs, out) -> argv
    own_input: str  # the key of `inputs` that is the input an output could clobber
    force: tuple[str, ...] | None  # the opt-in to write into a folder of other files (None: it has none)
    rerun_ok: bool  # its own earlier output is written again without the opt-in (resumed, updated)
    is_file: bool = False  # it writes one file, not a folder


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target) if source.is_dir() else shutil.copyfile(source, target)
    return target


def config_file(config: Config, path: Path) -> Path:
    save_config(config, path)
    return path


def prepare_inputs(art: Artefacts, work: Path) -> dict[str, Path]:
    return {"corpus": copy(art.corpus, work / "corpus")}


def prepare_argv(inputs: dict[str, Path], out: Path) -> list:
    config = small_config(inputs["corpus"], out, out.parent / "unused-run")
    return ["prepare", config_file(config, inputs["corpus"].parent / "prepare.yaml")]


def train_inputs(art: Artefacts, work: Path) -> dict[str, Path]:
    return {"prepared": copy(art.prepared, work / "prepared")}


def train_argv(inputs: dict[str, Path], out: Path) -> list:
    config = small_config(inputs["prepared"].parent / "corpus-unused", inputs["prepared"], out, max_steps=1,
                          eval_interval=0, keep_checkpoints=1)
    return ["train", config_file(config, inputs["prepared"].parent / "train.yaml")]


def sft_inputs(art: Artefacts, work: Path) -> dict[str, Path]:
    return {"base": copy(art.checkpoint, work / "base"), "data": copy(art.sft_data, work / "sft.jsonl")}


def sft_argv(inputs: dict[str, Path], out: Path) -> list:
    config = sft_config(inputs["base"], inputs["data"], out, "full")
    return ["sft", config_file(config, inputs["base"].parent / "sft.yaml")]


def eval_inputs(art: Artefacts, work: Path) -> dict[str, Path]:
    return {"run": copy(art.run, work / "evaluated")}


def eval_argv(inputs: dict[str, Path], out: Path) -> list:
    return ["eval", inputs["run"], "--tasks", "piqa", "--limit", "2", "--no-val-loss", "--data-dir",
            SHARED_DATA / "eval", "--output-json", out]


COMMANDS = [
    Command("prepare", prepare_inputs, prepare_argv, "corpus", ("data.overwrite=true",), rerun_ok=True),
    Command("train", train_inputs, train_argv, "prepared", ("train.overwrite=true",), rerun_ok=True),
    Command("sft", sft_inputs, sft_argv, "base", ("train.overwrite=true",), rerun_ok=True),
    Command("export", lambda art, work: {"checkpoint": copy(art.checkpoint, work / "checkpoint")},
            lambda inputs, out: ["export", inputs["checkpoint"], out], "checkpoint", ("--force",), rerun_ok=False),
    Command("import", lambda art, work: {"hf": copy(art.hf, work / "hf-in")},
            lambda inputs, out: ["import", inputs["hf"], out], "hf", ("--force",), rerun_ok=False),
    Command("merge", lambda art, work: {"checkpoint": copy(art.checkpoint, work / "checkpoint")},
            lambda inputs, out: ["merge", inputs["checkpoint"], out], "checkpoint", ("--force",), rerun_ok=False),
    Command("merge-adapter", lambda art, work: {"run": copy(art.lora_run, work / "lora-run")},
            lambda inputs, out: ["merge", inputs["run"], out.parent / f"{out.name}-merged", "--adapter-out", out],
            "run", ("--force",), rerun_ok=False),
    Command("consolidate", lambda art, work: {"checkpoint": copy(art.sharded, work / "sharded")},
            lambda inputs, out: ["consolidate", inputs["checkpoint"], out], "checkpoint", ("--force",),
            rerun_ok=False),
    Command("report", lambda art, work: {"run": copy(art.run, work / "reported")},
            lambda inputs, out: ["report", inputs["run"], "--out", out], "run", None, rerun_ok=True),
    Command("eval-json", eval_inputs, eval_argv, "run", None, rerun_ok=True, is_file=True),
]


# ================================================================================================= states
@dataclass(frozen=True)
class State:
    """Where a case points the command's output, and what must come of it."""

    name: str
    place: Callable[[Command, Artefacts, Path, dict[str, Path]], Path]  # builds the state, returns the output path
    refused: bool  # True: exit 2 with one line, every file as before, nothing created
    forced: bool = False  # the command gets its opt-in


def absent(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    return work / "new" / "deeper" / ("results.json" if cmd.is_file else "out")


def empty(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    (work / "empty").mkdir()
    return work / "empty" / "results.json" if cmd.is_file else work / "empty"


def user_files(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    if cmd.is_file:
        (work / "mine.json").write_text('{"mine": 1}\n')
        return work / "mine.json"
    folder = work / "users"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub" / "data.bin").write_bytes(os.urandom(64))
    return folder


def a_file(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    if cmd.is_file:  # a folder where a file is wanted
        (work / "folder.json").mkdir()
        return work / "folder.json"
    (work / "a-file").write_text("not a folder")
    return work / "a-file"


def under_a_file(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    (work / "a-file").write_text("not a folder")
    return work / "a-file" / ("results.json" if cmd.is_file else "out")


def read_only(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    folder = work / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "results.json" if cmd.is_file else folder


def own_input(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    target = inputs[cmd.own_input]
    if cmd.is_file:  # a file of the evaluated run
        return target / "metrics.jsonl"
    return target


def inside_own_input(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    return inputs[cmd.own_input] / ("results.json" if cmd.is_file else "out")


def inside_checkpoint(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    checkpoint = copy(art.checkpoint, work / "victim-checkpoint")
    return checkpoint / ("results.json" if cmd.is_file else "out")


def inside_run(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    run = copy(art.run, work / "victim-run")
    return run / ("results.json" if cmd.is_file else "out")


def another_artifact(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    """Another llamalite output, not of this purpose: prepared data (a run directory for prepare itself)."""
    if cmd.is_file:
        return copy(art.prepared / "manifest.json", work / "manifest.json")
    return copy(art.run if cmd.name == "prepare" else art.prepared, work / "victim")


def inside_prepared(cmd: Command, art: Artefacts, work: Path, inputs: dict[str, Path]) -> Path:
    return copy(art.prepared, work / "victim-data") / ("results.json" if cmd.is_file else "out")


STATES = [
    State("absent", absent, refused=False),
    State("empty", empty, refused=False),
    State("user-files", user_files, refused=True),
    State("user-files-forced", user_files, refused=False, forced=True),
    State("a-file", a_file, refused=True),
    State("under-a-file", under_a_file, refused=True),
    State("read-only", read_only, refused=True),
    State("own-input", own_input, refused=True),
    State("inside-own-input", inside_own_input, refused=True),
    State("inside-checkpoint", inside_checkpoint, refused=True),
    State("inside-run", inside_run, refused=True),
    State("inside-prepared-data", inside_prepared, refused=True),
    State("another-artifact", another_artifact, refused=True),
    State("another-artifact-forced", another_artifact, refused=True, forced=True),
]
CASES = [(cmd, state) for cmd in COMMANDS for state in STATES
         if not (state.forced and cmd.force is None)  # no opt-in to give
         and not (state.name == "user-files-forced" and cmd.is_file)]  # a user's file is never replaced


def every_path(folder: Path) -> set[str]:
    """Every entry under `folder`, folders, hidden files and .lock included: what 'nothing created' compares."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def argv_of(cmd: Command, inputs: dict[str, Path], out: Path, forced: bool) -> list:
    return [*cmd.argv(inputs, out), *(cmd.force if forced else ())]


def no_temporaries(work: Path) -> None:
    left = [p for p in work.rglob(".tmp_*")]
    assert not left, f"temporaries left behind: {left}"


@pytest.fixture
def work(tmp_path):
    yield tmp_path / "case"
    for path in tmp_path.rglob("*"):  # read-only folders would stop pytest's cleanup
        if path.is_dir():
            path.chmod(stat.S_IRWXU)


@pytest.mark.parametrize(("cmd", "state"), CASES, ids=[f"{cmd.name}-{state.name}" for cmd, state in CASES])
def test_every_writing_command_in_every_output_state(artefacts, cmd, state, work, capsys):
    work.mkdir()
    inputs = cmd.inputs(artefacts, work)
    out = state.place(cmd, artefacts, work, inputs)
    argv = argv_of(cmd, inputs, out, state.forced)
    before, paths_before = tree_snapshot(work), every_path(work)

    outcome = run_main(capsys, argv)

    assert_clean_outcome(outcome, allow_success=not state.refused)
    after = tree_snapshot(work)
    if state.refused:
        assert outcome.code == 2
        assert every_path(work) == paths_before, f"created: {sorted(every_path(work) - paths_before)}"
        assert after == before
        return
    assert outcome.code == 0, outcome.err[-2000:]
    kept = {name: digest for name, digest in before.items() if not name.startswith(("new", "empty"))}
    changed = sorted(name for name, digest in kept.items() if after.get(name) != digest
                     and not (cmd.name == "eval-json" and name.startswith("evaluated/")))  # eval records its run
    assert not changed, f"changed or lost: {changed}"
    assert out.is_file() if cmd.is_file else any(out.iterdir())
    no_temporaries(work)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[cmd.name for cmd in COMMANDS])
def test_a_rerun_into_its_own_output_resumes_or_needs_the_opt_in(artefacts, cmd, work, capsys):
    work.mkdir()
    inputs = cmd.inputs(artefacts, work)
    out = work / ("results.json" if cmd.is_file else "out")
    first = run_main(capsys, argv_of(cmd, inputs, out, forced=False))
    assert first.code == 0, first.err[-2000:]
    before, paths_before = tree_snapshot(work), every_path(work)

    again = run_main(capsys, argv_of(cmd, inputs, out, forced=False))
    assert_clean_outcome(again)
    assert again.code == (0 if cmd.rerun_ok else 2)
    if not cmd.rerun_ok:  # refused as today ("is not empty ... --force"), nothing touched
        assert "--force" in again.err and every_path(work) == paths_before and tree_snapshot(work) == before
        forced = run_main(capsys, argv_of(cmd, inputs, out, forced=True))
        assert forced.code == 0, forced.err[-2000:]
    no_temporaries(work)


def test_prepare_into_prepared_data_of_another_corpus_is_refused_then_replaced_on_request(artefacts, work, capsys):
    """The issue's example: the first folder's manifest, tokenizer and shards survive a prepare of another corpus."""
    work.mkdir()
    out = work / "prepared"
    first = copy(artefacts.corpus, work / "corpus")
    assert run_main(capsys, prepare_argv({"corpus": first}, out)).code == 0
    other = work / "other-corpus"
    other.mkdir()
    for index, doc in enumerate(sorted(first.iterdir())[:30]):
        (other / f"o{index}.txt").write_text(doc.read_text().replace("king", "knave"))
    before = tree_snapshot(out)

    refused = run_main(capsys, prepare_argv({"corpus": other}, out))
    assert_clean_outcome(refused, allow_success=False)
    assert "made from other inputs" in refused.err and "data.overwrite=true" in refused.err
    assert tree_snapshot(out) == before

    assert run_main(capsys, prepare_argv({"corpus": first}, out)).code == 0  # the same inputs: reused as before
    assert tree_snapshot(out) == before
    replaced = run_main(capsys, [*prepare_argv({"corpus": other}, out), "data.overwrite=true"])
    assert replaced.code == 0 and tree_snapshot(out) != before


ALL_OR_NOTHING = {  # command -> the function whose failure stands for a full disk mid-write
    "export": "llamalite.export.hf.save_weights",
    "import": "llamalite.checkpoint.format.save_file",
    "merge": "llamalite.checkpoint.format.save_file",
    "merge-adapter": "llamalite.sft.save_adapter",
    "consolidate": "llamalite.checkpoint.format.save_file",
}


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.name in ALL_OR_NOTHING], ids=lambda c: c.name)
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "forced-into-user-folder"])
def test_a_failed_write_leaves_no_folder_no_temporary_and_the_users_files(artefacts, cmd, existing, work, capsys,
                                                                         monkeypatch):
    work.mkdir()
    inputs = cmd.inputs(artefacts, work)
    out = user_files(cmd, artefacts, work, inputs) if existing else work / "out"
    argv = argv_of(cmd, inputs, out, forced=existing)
    before, paths_before = tree_snapshot(work), every_path(work)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ALL_OR_NOTHING[cmd.name], fail)
    with pytest.raises(OSError):
        run_main(capsys, argv)
    assert every_path(work) == paths_before, f"left: {sorted(every_path(work) - paths_before)}"
    assert tree_snapshot(work) == before


# ================================================================================================= the policy itself
PURPOSES = ["prepared-data", "run", "checkpoint", "hf-export", "adapter", "report"]
ARTIFACT_FILES = {  # what each kind of folder holds when made before the marker existed
    "checkpoint": {"trainer_state.json": "{}", "checksums.json": "{}"},
    "run": {"metrics.jsonl": ""},
    "prepared-data": {"manifest.json": '{"format_version": 1, "splits": {}}'},
    "hf-export": {"config.json": "{}", "model.safetensors": ""},
    "adapter": {"adapter_config.json": "{}"},
    "report": {"index.html": "", "loss.png": ""},
}
names = st.text(alphabet="abcxyz_0123456789", min_size=1, max_size=8)
folder_kinds = st.sampled_from(["absent", "empty", "user-files", "marker", "legacy", "file"])


@st.composite
def folder_states(draw):
    """A nest of folders (the output at its end) and, for each level, what it holds."""
    depth = draw(st.integers(1, 3))
    levels = [(draw(names), draw(folder_kinds), draw(st.sampled_from(PURPOSES)),
               draw(st.lists(names, max_size=3, unique=True))) for _ in range(depth)]
    return levels, draw(st.sampled_from(PURPOSES)), draw(st.booleans()), draw(st.booleans())


def build(root: Path, levels) -> Path:
    path = root
    for index, (name, kind, purpose, user_names) in enumerate(levels):
        path = path / f"{index}{name}"
        if path.parent.is_file() or not path.parent.exists() or kind == "absent":
            return path
        if kind == "file":
            path.write_text("a user's file")
            continue
        path.mkdir()
        if kind == "marker":
            (path / OUTPUT_MARKER).write_text(json.dumps({"purpose": purpose}))
        if kind == "legacy":
            for file, text in ARTIFACT_FILES[purpose].items():
                (path / file).write_text(text)
        if kind in ("user-files", "marker", "legacy"):
            for user_name in user_names:
                (path / f"u_{user_name}.txt").write_text(user_name)
    return path


def expected_refusal(root: Path, out: Path, purpose: str, force: bool, rerun: bool) -> bool:
    """The rules of docs/safety.md, written independently of files.py's code."""
    for folder in out.relative_to(root).parents:
        folder = root / folder
        if folder != root and folder.is_file():
            return True
        if folder != root and folder.is_dir() and artifact_kind(folder) is not None:
            return True
    if out.is_file() or (not out.exists() and any(p.is_file() for p in out.parents)):
        return True
    if not out.is_dir():
        return False
    kind = artifact_kind(out)
    if kind is not None and kind != purpose:
        return True
    if not [p for p in out.iterdir() if p.name not in (OUTPUT_MARKER, ".lock")]:
        return False
    if kind == purpose and rerun:
        return False
    return not force


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=folder_states())
def test_the_policy_over_generated_folder_states(tmp_path_factory, state):
    levels, purpose, force, rerun = state
    root = tmp_path_factory.mktemp("state")
    out = build(root, levels)
    before, paths_before = tree_snapshot(root), every_path(root)
    try:
        claim = claim_output(out, purpose, "the output", force=force, rerun=rerun)
    except ConfigError as exc:
        assert expected_refusal(root, out, purpose, force, rerun), f"refused: {exc}"
        assert "\n" not in str(exc)
        assert every_path(root) == paths_before and tree_snapshot(root) == before
        return
    assert not expected_refusal(root, out, purpose, force, rerun), "accepted what the rules refuse"
    assert every_path(root) == paths_before, "claiming wrote something"
    claim.create()
    assert artifact_kind(out) == purpose
    assert {name: digest for name, digest in tree_snapshot(root).items() if name in before} == before
    claim.undo()
    assert every_path(root) == paths_before and tree_snapshot(root) == before, "undo removed or left something"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inside=st.lists(names, min_size=0, max_size=3), holds=st.booleans())
def test_an_output_is_never_an_input_nor_inside_one_nor_holding_one(tmp_path_factory, inside, holds):
    root = tmp_path_factory.mktemp("inputs")
    source = root / "source"
    source.mkdir()
    if holds:  # the output is a folder that holds the input somewhere below it
        out, given_input = source, source.joinpath(*inside, "doc.txt")
        given_input.parent.mkdir(parents=True, exist_ok=True)
    else:  # the output is the input folder or lies inside it
        out, given_input = source.joinpath(*inside), source
    given_input.write_text("text") if holds else (source / "doc.txt").write_text("text")
    paths_before = every_path(root)
    with pytest.raises(ConfigError, match="input of this command"):
        claim_output(out, "prepared-data", "the output", inputs=(given_input,), force=True, rerun=True)
    assert every_path(root) == paths_before


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "made before markers"])
@pytest.mark.parametrize("command, victim", [("sft", "run"), ("train", "lora_run")])
def test_a_fine_tuning_run_and_a_pretraining_run_never_take_each_others_directory(artefacts, command, victim, marked,
                                                                                 work, capsys):
    run_dir = copy(getattr(artefacts, victim), work / "victim")
    for marker in [] if marked else run_dir.rglob(OUTPUT_MARKER):  # told apart by its config.yaml then
        marker.unlink()
    inputs = (sft_inputs if command == "sft" else train_inputs)(artefacts, work)
    before = tree_snapshot(run_dir)
    outcome = run_main(capsys, (sft_argv if command == "sft" else train_argv)(inputs, run_dir))
    assert_clean_outcome(outcome, allow_success=False)
    assert "run directory" in outcome.err
    assert_untouched(before, run_dir)


# ================================================================================================= overwrite: own only
# A user's files in every folder of a run directory, with names that look like the run's own but are not: each must
# survive train.overwrite=true, while every file the run wrote goes (no stale checkpoint left for a resume to pick).
USER_FILES_IN_A_RUN = [
    "NOTES.txt", "metrics.jsonl.bak", "my_metrics.jsonl", "events.jsonl~", "wandb_run_id.txt",
    "checkpoints/NOTES.txt", "checkpoints/step_12/model.safetensors", "checkpoints/notes_step_0000001",
    "checkpoints/step_0000001.bak", "checkpoints/step_00000x1", "checkpoints/latest.txt", "checkpoints/old/latest",
    "checkpoints/.tmp_mine", "tb/other_experiment/events.out", "tb/other_experiment/events.out.tfevents.1.h.1.0",
    "tb/notes.md", "tb/myevents.out.tfevents.1", "report/my_analysis.md", "report/index.html.orig",
    "wandb/my-notes.txt", "wandb/runs.csv", "nested/checkpoints/step_0000001/x", "nested/metrics.jsonl",
]
RUN_OWN_PLANTED = [  # what an earlier attempt of the run (W&B, a crash mid-write) would have left: the run's own
    "wandb_run_id", "wandb/offline-run-20260101_000000-abc/files/x", "wandb/latest-run", "wandb/debug.log",
    "checkpoints/.tmp_step_0000009/x", "checkpoints/.tmp_pruned_step_0000003/x", "checkpoints/step_0000007/x",
]


def test_train_overwrite_keeps_every_user_file_in_every_folder_of_the_run(artefacts, work, capsys):
    work.mkdir()
    inputs = train_inputs(artefacts, work)
    run_dir = work / "run"
    assert run_main(capsys, train_argv(inputs, run_dir)).code == 0
    assert run_main(capsys, ["report", run_dir]).code == 0
    for name in USER_FILES_IN_A_RUN + RUN_OWN_PLANTED:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(f"mine: {name}\n")
    user = {name: digest for name, digest in tree_snapshot(run_dir).items()
            if name in USER_FILES_IN_A_RUN or name.startswith("report/")}
    old_events = set(run_dir.glob("tb/events.out.tfevents.*"))

    outcome = run_main(capsys, [*train_argv(inputs, run_dir), "train.overwrite=true"])

    assert outcome.code == 0, outcome.err[-2000:]
    assert_untouched(user, run_dir)  # the report (report's output, not train's) stays too
    for name in RUN_OWN_PLANTED:
        assert not (run_dir / name).exists(), f"{name} of the earlier run was kept"
    assert not old_events & set(run_dir.glob("tb/events.out.tfevents.*"))
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_0000001"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.lists(st.tuples(st.sampled_from(["", "checkpoints/", "tb/", "wandb/", "report/", "tb/x/",
                                                "checkpoints/step_0000001/"]),
                               st.text(alphabet="abcdefgijklmnopqrstuvwxyz._-0123456789", min_size=1, max_size=24)),
                     max_size=6))
def test_overwrite_deletes_only_names_the_run_writes_over_generated_names(tmp_path_factory, user):
    """The choke point itself (files.remove_own_files with trainer.RUN_FILES): a drawn name is deleted only when it
    is exactly one the run writes; everything else, in any folder, stays."""
    from llamalite.files import remove_own_files
    from llamalite.train.trainer import RUN_FILES, RUN_FOLDERS

    root = tmp_path_factory.mktemp("own")
    for folder, name in user:
        path = root / folder / name
        if name in (".", "..") or path.parent.is_file() or path.is_dir():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    def ours(relative: str) -> bool:
        parts = relative.split("/")
        return any(RUN_FILES.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1))

    remove_own_files(root, RUN_FILES, empty_folders=RUN_FOLDERS)
    left = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert left == {name for name in files if not ours(name)}


# ================================================================================================= early failures
def _missing_source(config: Config, work: Path) -> None:
    config.data.sources[0].path = str(work / "no-such-corpus")


def _tokenizer_folder_without_tokenizer(config: Config, work: Path) -> None:
    config.tokenizer.path = str(Path(config.data.sources[0].path))


def _tokenizer_is_a_yaml_file(config: Config, work: Path) -> None:
    (work / "tok.yaml").write_text("a: 1\n")
    config.tokenizer.path = str(work / "tok.yaml")


def _tokenizer_is_empty_json(config: Config, work: Path) -> None:
    (work / "tok.json").write_text("{}")
    config.tokenizer.path = str(work / "tok.json")


def _tokenizer_path_missing(config: Config, work: Path) -> None:
    config.tokenizer.path = str(work / "no-tokenizer.json")


def _jsonl_records(lines: list[str]) -> Callable[[Config, Path], None]:
    def use(config: Config, work: Path) -> None:
        (work / "src.jsonl").write_text("".join(line + "\n" for line in lines))
        config.data.sources[0].type, config.data.sources[0].path = "jsonl", str(work / "src.jsonl")
    use.__name__ = "jsonl"
    return use


PREPARE_FAILURES = {
    "missing-source": _missing_source,
    "tokenizer-folder-without-tokenizer": _tokenizer_folder_without_tokenizer,
    "tokenizer-a-yaml-file": _tokenizer_is_a_yaml_file,
    "tokenizer-empty-json": _tokenizer_is_empty_json,
    "tokenizer-missing": _tokenizer_path_missing,
    "record-without-text": _jsonl_records(['{"txt": "hello"}']),
    "record-text-not-a-string": _jsonl_records(['{"text": 5}']),
    "record-not-json": _jsonl_records(["not json"]),
    "no-documents": _jsonl_records([]),
    "too-few-documents": _jsonl_records(['{"text": "one short document"}']),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "empty-folder"])
@pytest.mark.parametrize("failure", list(PREPARE_FAILURES), ids=list(PREPARE_FAILURES))
def test_a_prepare_that_fails_before_any_work_leaves_nothing(artefacts, failure, existing, work, capsys):
    work.mkdir()
    corpus = copy(artefacts.corpus, work / "corpus")
    out = work / "new" / "prepared"
    if existing:
        out.mkdir(parents=True)
    config = small_config(corpus, out, work / "unused-run")
    PREPARE_FAILURES[failure](config, work)
    argv = ["prepare", config_file(config, work / "prepare.yaml")]
    paths_before = every_path(work)

    outcome = run_main(capsys, argv)

    assert_clean_outcome(outcome, allow_success=False)
    assert every_path(work) == paths_before, f"left: {sorted(every_path(work) - paths_before)}"


def test_a_prepare_that_fails_after_a_finished_shard_keeps_it_to_resume(artefacts, work, capsys, monkeypatch):
    """What is resumable stays on purpose (docs/safety.md): the failure comes after a progress record."""
    from llamalite.data import prepare as prepare_module

    work.mkdir()
    corpus = copy(artefacts.corpus, work / "corpus")
    out = work / "prepared"
    config = small_config(corpus, out, work / "unused-run")
    config.data.shard_tokens = 2048
    argv = ["prepare", config_file(config, work / "prepare.yaml")]

    real_write_progress = prepare_module.write_progress
    calls = []

    def write_progress_then_fail(*args, **kwargs):
        real_write_progress(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # after the first finished shard
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_progress", write_progress_then_fail)
    assert run_main(capsys, argv).code == 130  # interrupted (Ctrl-C)
    assert (out / prepare_module.PROGRESS_FILE).is_file() and (out / prepare_module.TOKENIZER_FILE).is_file()
    assert (out / "train_000000.bin").is_file()
    monkeypatch.undo()
    assert run_main(capsys, argv).code == 0  # resumed


def _point(section: str, key: str, name: str, content: str | None = None) -> Callable[[Config, Path], None]:
    """Set config.<section>.<key> to work/<name>: a file of `content`, a folder ("/"), or nothing (None)."""
    def breaks(config: Config, work: Path) -> None:
        if content == "/":
            (work / name).mkdir()
        elif content is not None:
            (work / name).write_text(content)
        setattr(getattr(config, section), key, str(work / name))
    return breaks


TRAIN_FAILURES = {  # (command, how to break its config) -> each fails after parsing, before any training
    "train-missing-data": ("train", _point("data", "out_dir", "no-data")),
    "train-empty-data": ("train", _point("data", "out_dir", "empty-data", "/")),
    "train-data-a-file": ("train", _point("data", "out_dir", "data.txt", "text")),
    "train-vocab-too-small": ("train", lambda config, work: setattr(config.model, "vocab_size", 100)),
    "sft-missing-data": ("sft", _point("sft", "data", "no-such.jsonl")),
    "sft-empty-data": ("sft", _point("sft", "data", "empty.jsonl", "")),
    "sft-records-without-fields": ("sft", _point("sft", "data", "bad.jsonl", '{"x": 1}\n' * 5)),
    "sft-data-not-json": ("sft", _point("sft", "data", "bad.jsonl", "not json\n" * 5)),
    "sft-missing-base": ("sft", _point("sft", "base", "no-base")),
    "sft-base-empty-folder": ("sft", _point("sft", "base", "empty-base", "/")),
}


@pytest.mark.parametrize("failure", list(TRAIN_FAILURES), ids=list(TRAIN_FAILURES))
def test_a_train_or_sft_that_fails_before_any_work_leaves_no_folder(artefacts, failure, work, capsys):
    work.mkdir()
    command, breaks = TRAIN_FAILURES[failure]
    out = work / "new" / "run"
    if command == "train":
        inputs = train_inputs(artefacts, work)
        config = small_config(inputs["prepared"].parent / "corpus-unused", inputs["prepared"], out, max_steps=1,
                              eval_interval=0)
    else:
        inputs = sft_inputs(artefacts, work)
        config = sft_config(inputs["base"], inputs["data"], out, "full")
    breaks(config, work)
    argv = [command, config_file(config, work / f"{command}.yaml")]
    paths_before = every_path(work)

    outcome = run_main(capsys, argv)

    assert_clean_outcome(outcome, allow_success=False)
    assert every_path(work) == paths_before, f"left: {sorted(every_path(work) - paths_before)}"


# ================================================================================================= output files
def _fifo(work: Path) -> Path:
    os.mkfifo(work / "results.json")
    return work / "results.json"


def _link_to(target: Path, work: Path) -> Path:
    (work / "results.json").symlink_to(target)
    return work / "results.json"


def _sparse(work: Path) -> Path:
    with open(work / "results.json", "wb") as f:
        f.truncate(1 << 30)  # a gigabyte of zeros, on no disk
    return work / "results.json"


def _link_to_folder(work: Path) -> Path:
    (work / "folder").mkdir()
    return _link_to(work / "folder", work)


def _socket(work: Path) -> Path:
    import socket

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(work / "results.json"))
    server.close()
    return work / "results.json"


NOT_REGULAR_OUTPUTS = {
    "fifo": _fifo,
    "link-to-fifo": lambda work: _link_to(_fifo(work).rename(work / "pipe"), work),
    "dev-null": lambda work: Path("/dev/null"),
    "dev-zero": lambda work: Path("/dev/zero"),
    "dev-full": lambda work: Path("/dev/full"),
    "link-to-dev-zero": lambda work: _link_to(Path("/dev/zero"), work),
    "socket": _socket,
    "link-to-folder": _link_to_folder,
    "sparse-1GiB": _sparse,
}


@pytest.mark.parametrize("state", list(NOT_REGULAR_OUTPUTS), ids=list(NOT_REGULAR_OUTPUTS))
def test_eval_output_json_onto_what_is_not_a_small_regular_file_is_refused_unread(artefacts, state, work, capsys):
    work.mkdir()
    inputs = eval_inputs(artefacts, work)
    out = NOT_REGULAR_OUTPUTS[state](work)
    if not (out.exists() or out.is_symlink()):
        pytest.skip(f"{out} does not exist here")
    paths_before = every_path(work)

    with fails_after(20):
        outcome = run_main(capsys, eval_argv(inputs, out))

    assert_clean_outcome(outcome, allow_success=False)
    assert str(out) in outcome.err
    assert every_path(work) == paths_before


@pytest.mark.parametrize("state", list(NOT_REGULAR_OUTPUTS), ids=list(NOT_REGULAR_OUTPUTS))
def test_an_output_file_that_is_not_a_small_regular_file_is_never_offered_to_recognise(tmp_path, state):
    """claim_output_file, for every output file of the policy: a recogniser that would accept anything is not even
    asked about a FIFO, a device, a socket, a folder or a file too large to be ours."""
    from llamalite.files import claim_output_file, read_regular_file

    out = NOT_REGULAR_OUTPUTS[state](tmp_path)
    if not (out.exists() or out.is_symlink()):
        pytest.skip(f"{out} does not exist here")
    asked = []
    with fails_after(20):
        with pytest.raises(ConfigError) as refused:
            claim_output_file(out, "eval-results", "--output-json", recognise=lambda path: asked.append(path) or True)
        assert read_regular_file(out) is None
    assert not asked and "\n" not in str(refused.value)


@pytest.mark.parametrize("pattern, reaches", [("corpus/**", True), ("corpus/**/*.txt", True), ("corpus/*/*", True),
                                              ("corpus/*.txt", False), ("corpus/doc0?.txt", False)])
def test_prepare_never_writes_where_its_glob_source_could_match(artefacts, work, capsys, pattern, reaches):
    corpus = copy(artefacts.corpus, work / "corpus")
    (corpus / "more").mkdir()
    (corpus / "more" / "doc.txt").write_text("a document one level down")
    before = tree_snapshot(corpus)
    config = small_config(work / pattern, corpus / "prepared", work / "unused-run")
    argv = ["prepare", config_file(config, work / "prepare.yaml")]
    outcome = run_main(capsys, argv)
    assert_untouched(before, corpus)
    if reaches:  # its next run would read the prepared data as corpus
        assert_clean_outcome(outcome, allow_success=False)
        assert "an input of this command" in outcome.err
        assert not (corpus / "prepared").exists()
    else:
        assert outcome.code == 0, outcome.err
        assert run_main(capsys, argv).code == 0  # the rerun finds the same inputs: up to date
