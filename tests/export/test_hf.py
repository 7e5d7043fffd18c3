import dataclasses
import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llamalite.checkpoint.format import load_checkpoint, save_checkpoint
from llamalite.checkpoint.inference import load_for_inference
from llamalite.cli import main
from llamalite.config import Config, DataConfig
from llamalite.errors import CheckpointError, ExportError
from llamalite.eval.harness import TaskResult
from llamalite.eval.suite import eval_record
from llamalite.export.hf import export_checkpoint, import_hf, parse_size
from llamalite.model.llama import Llama, ModelConfig, RMSNorm
from llamalite.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "the king and the queen speak of love and war",
    "a fair lady walks at night under the crown of stars",
    "good lord, the sword is heavy and the heart is light",
    "come now, go now, the day is foul and fair",
]
TEXT = "the queen speaks of war at night"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    Tokenizer.train(SENTENCES * 10, vocab_size=300).save(folder / "tokenizer.json")
    return folder


def random_model(vocab_size: int, tie: bool = False, n_kv_head: int = 2, seed: int = 0, **options) -> Llama:
    """Random weights large enough that logits are O(1), and RMSNorm gains away from 1 so that the norms matter."""
    torch.manual_seed(seed)
    model = Llama(ModelConfig(vocab_size=vocab_size, n_layer=2, d_model=32, n_head=4, n_kv_head=n_kv_head,
                              ffn_hidden=64, max_seq_len=32, rope_theta=50000.0, tie_embeddings=tie, init_std=0.2,
                              **options))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model


def write_checkpoint(run_dir, model: Llama, data_dir, step: int = 7):
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    config = Config(name="tiny-test", model=model.config, data=DataConfig(out_dir=str(data_dir)))
    state = {"step": step, "tokens_seen": step * 64, "tokenizer_fingerprint": tokenizer.fingerprint,
             "config": config.to_dict()}
    return save_checkpoint(run_dir / "checkpoints", step, model, None, state)


def padded_vocab(data_dir) -> int:
    return Tokenizer.load(data_dir / "tokenizer.json").padded_vocab_size(64)


def hf_logits(folder, tokens, dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    with torch.no_grad():
        return model(tokens).logits.float()


def our_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def random_tokens(vocab_size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (3, 32), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("tie,n_kv_head", [(False, 2), (False, 4), (True, 2), (True, 4)],
                         ids=["untied-gqa", "untied-mha", "tied-gqa", "tied-mha"])
def test_exported_model_gives_our_logits(tokenizer_dir, tmp_path, tie, n_kv_head):
    model = random_model(padded_vocab(tokenizer_dir), tie=tie, n_kv_head=n_kv_head)
    out = export_checkpoint(write_checkpoint(tmp_path / "run", model, tokenizer_dir), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is tie
    assert config["num_key_value_heads"] == n_kv_head and config["rope_parameters"]["rope_theta"] == 50000.0
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tie
    tokens = random_tokens(model.config.vocab_size)
    ours = our_logits(model, tokens)
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert (hf_logits(out, tokens) - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_qk_norm_model_exports_as_qwen3_with_our_logits_and_imports_back(tokenizer_dir, tmp_path, tie):
    model = random_model(padded_vocab(tokenizer_dir), tie=tie, qk_norm=True, zero_init_residual=True)
    with torch.no_grad():  # zero-initialised projections would hide the attention path: give them weights
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0, 0.2)
    out = export_checkpoint(write_checkpoint(tmp_path / "run", model, tokenizer_dir), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert "model.layers.0.self_attn.q_norm.weight" in load_file(out / "model.safetensors")
    tokens = random_tokens(model.config.vocab_size)
    ours = our_logits(model, tokens)
    assert ours.abs().max() > 1.0
    assert (hf_logits(out, tokens) - ours).abs().max() <= 1e-5
    without_norm = Llama(dataclasses.replace(model.config, qk_norm=False))
    without_norm.load_state_dict({k: v for k, v in model.state_dict().items() if "_norm." not in k or "layernorm" in k})
    assert (our_logits(without_norm, tokens) - ours).abs().max() > 1e-2  # the q/k norms change the logits

    imported = load_for_inference(import_hf(out, tmp_path / "imported")).model
    assert imported.config.qk_norm
    assert torch.equal(our_logits(imported, tokens), ours)


def test_a_soft_capped_model_is_refused_by_export_with_one_line(tokenizer_dir, tmp_path, capsys):
    model = random_model(padded_vocab(tokenizer_dir), logit_softcap=15.0)
    checkpoint = write_checkpoint(tmp_path / "run", model, tokenizer_dir)
    with pytest.raises(ExportError, match="logit_softcap=15.0 has no equivalent"):
        export_checkpoint(checkpoint, tmp_path / "hf")
    assert main(["export", str(checkpoint), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


def test_a_trained_run_exports_with_its_prepared_tokenizer(corpus_dir, prepared_dir, tmp_path):
    from llamalite.train.trainer import Trainer
    from tests.conftest import small_config

    trainer = Trainer(small_config(corpus_dir, prepared_dir, tmp_path / "run", max_steps=2, eval_interval=2))
    trainer.fit()
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    tokens = random_tokens(trainer.tokenizer.size)[:, :16]
    assert (hf_logits(out, tokens) - our_logits(trainer.model.eval(), tokens)).abs().max() <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(out)(TEXT).input_ids == trainer.tokenizer.encode(TEXT)
    assert "| training steps | 2 |" in (out / "README.md").read_text()


def test_exported_tokenizer_encodes_like_ours_and_eos_is_the_tokenizers(tokenizer_dir, tmp_path):
    ours = Tokenizer.load(tokenizer_dir / "tokenizer.json")
    out = export_checkpoint(write_checkpoint(tmp_path / "run", random_model(padded_vocab(tokenizer_dir)),
                                             tokenizer_dir),
                            tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in [TEXT, *SENTENCES, "unseen wörds: 42!"]:
        assert theirs(text).input_ids == ours.encode(text)
    assert theirs.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.eos_id
    assert theirs.model_max_length == 32
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == ours.eos_id and generation.pad_token_id == ours.eos_id
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_a_literal_end_of_text_is_the_special_id_in_transformers_unless_special_tokens_are_split(tokenizer_dir,
                                                                                                  tmp_path):
    """docs/export.md, "Special tokens in text": llamalite spells a literal <|endoftext|> with ordinary pieces;
    transformers maps it to the special id by default, and gives our ids with split_special_tokens=True."""
    ours = Tokenizer.load(tokenizer_dir / "tokenizer.json")
    out = export_checkpoint(write_checkpoint(tmp_path / "run", random_model(padded_vocab(tokenizer_dir)),
                                             tokenizer_dir),
                            tmp_path / "hf")
    text = "the king speaks<|endoftext|>the queen"
    mine = ours.encode(text)
    assert ours.eos_id not in mine
    default = transformers.AutoTokenizer.from_pretrained(out)(text).input_ids
    assert default.count(ours.eos_id) == 1 and default != mine
    assert transformers.AutoTokenizer.from_pretrained(out, split_special_tokens=True)(text).input_ids == mine


def test_generate_stops_at_eos(tokenizer_dir, tmp_path):
    eos = Tokenizer.load(tokenizer_dir / "tokenizer.json").eos_id
    model = random_model(padded_vocab(tokenizer_dir))
    with torch.no_grad():  # every layer adds nothing, so the final norm sees the embedding: all ones
        for parameter in model.parameters():
            parameter.zero_()
        model.embed_tokens.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        model.lm_head.weight[eos] = 10.0  # greedy picks eos at once
    out = export_checkpoint(write_checkpoint(tmp_path / "run", model, tokenizer_dir), tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    prompt = torch.tensor([[5, 6, 7]])
    generated = hf_model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    assert generated == [5, 6, 7, eos]


def test_trimmed_vocab_and_bf16_exports_load_with_matching_logits(tokenizer_dir, tmp_path):
    tokenizer_size = Tokenizer.load(tokenizer_dir / "tokenizer.json").size
    model = random_model(padded_vocab(tokenizer_dir), tie=True)
    assert model.config.vocab_size > tokenizer_size
    checkpoint = write_checkpoint(tmp_path / "run", model, tokenizer_dir)
    tokens = random_tokens(tokenizer_size)
    ours = our_logits(model, tokens)

    trimmed = export_checkpoint(checkpoint, tmp_path / "trimmed", trim_vocab=True)
    assert json.loads((trimmed / "config.json").read_text())["vocab_size"] == tokenizer_size
    assert load_file(trimmed / "model.safetensors")["model.embed_tokens.weight"].shape[0] == tokenizer_size
    assert (hf_logits(trimmed, tokens) - ours[..., :tokenizer_size]).abs().max() <= 1e-5

    bf16 = export_checkpoint(checkpoint, tmp_path / "bf16", dtype="bf16")
    assert load_file(bf16 / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(bf16)
    assert loaded.dtype == torch.bfloat16
    assert (hf_logits(bf16, tokens, dtype=torch.float32) - ours).abs().max() < 0.1 * ours.abs().max()


def test_a_small_shard_size_writes_shards_with_an_index(tokenizer_dir, tmp_path):
    model = random_model(padded_vocab(tokenizer_dir))
    out = export_checkpoint(write_checkpoint(tmp_path / "run", model, tokenizer_dir), tmp_path / "hf",
                            shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    tokens = random_tokens(model.config.vocab_size)
    assert (hf_logits(out, tokens) - our_logits(model, tokens)).abs().max() <= 1e-5


def test_shard_sizes_parse_like_transformers():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500") == 500
    with pytest.raises(ExportError, match="not a size"):
        parse_size("5 parsecs")


def test_model_card_reports_tokens_val_loss_and_latest_evals(tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    checkpoint = write_checkpoint(run_dir, random_model(padded_vocab(tokenizer_dir)), tokenizer_dir, step=7)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "val/loss": 5.5}, {"step": 6, "val/loss": 4.25}, {"step": 9, "val/loss": 4.0}]) + "\n")
    write_evals(run_dir, {3: 0.2, 7: 0.3125})
    card = (export_checkpoint(checkpoint, tmp_path / "hf") / "README.md").read_text()
    assert "| training tokens | 448 |" in card and "| training steps | 7 |" in card
    assert "4.2500 (step 6)" in card
    assert "At step 7 (the exported checkpoint, on the first 16 examples" in card
    assert "| task | metric | value | stderr |" in card
    assert "| hellaswag | acc_norm | 0.3125 | 0.1197 |" in card and "| hellaswag | acc | 0.2500 | 0.1118 |" in card
    assert "| lambada_openai | perplexity | 42.5000 | - |" in card
    assert "| lambada_openai | acc | 0.3750 | 0.1250 |" in card


def write_evals(run_dir, acc_norm_by_step):
    """evals.jsonl as `llamalite eval` writes it (suite.eval_record): metrics under "metrics", with stderr."""
    records = []
    for step, acc_norm in acc_norm_by_step.items():
        hellaswag = TaskResult("hellaswag", 16, {"acc": 0.25, "acc_stderr": 0.1118, "acc_norm": acc_norm,
                                                 "acc_norm_stderr": 0.1197}, 0.25)
        lambada = TaskResult("lambada_openai", 16, {"acc": 0.375, "acc_stderr": 0.125, "perplexity": 42.5}, 0.0)
        records.append(eval_record(step, step * 64, 1.0, "eval", {"hellaswag": hellaswag, "lambada_openai": lambada},
                                   {"val/loss": 4.0}, f"step_{step:07d}", 16))
    (run_dir / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_model_card_falls_back_to_the_newest_evaluated_step(tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    checkpoint = write_checkpoint(run_dir, random_model(padded_vocab(tokenizer_dir)), tokenizer_dir, step=7)
    write_evals(run_dir, {3: 0.2, 5: 0.25})
    card = (export_checkpoint(checkpoint, tmp_path / "hf") / "README.md").read_text()
    assert "At step 5 (the newest evaluated step; step 7 has none" in card
    assert "| hellaswag | acc_norm | 0.2500 | 0.1197 |" in card and "0.2000" not in card


def test_a_tokenizer_other_than_the_runs_is_refused(tokenizer_dir, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run", random_model(padded_vocab(tokenizer_dir)), tokenizer_dir)
    Tokenizer.train(["something else entirely"] * 5, vocab_size=280).save(tmp_path / "other.json")
    with pytest.raises(CheckpointError, match="fingerprint differs"):
        export_checkpoint(checkpoint, tmp_path / "hf", tokenizer_path=tmp_path / "other.json")
    with pytest.raises(CheckpointError, match="tokenizer not found"):
        export_checkpoint(checkpoint, tmp_path / "hf", tokenizer_path=tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------ import
def hf_llama_folder(folder, tokenizer_dir, tie: bool):
    ours = Tokenizer.load(tokenizer_dir / "tokenizer.json")
    config = transformers.LlamaConfig(
        vocab_size=ours.size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0}, initializer_range=0.2,
        bos_token_id=ours.eos_id, eos_token_id=ours.eos_id)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    return model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_imported_transformers_model_gives_its_logits(tokenizer_dir, tmp_path, tie):
    hf_model = hf_llama_folder(tmp_path / "hf", tokenizer_dir, tie)
    checkpoint = import_hf(tmp_path / "hf", tmp_path / "imported")
    model = load_for_inference(checkpoint).model
    assert model.config.rope_theta == 20000.0 and model.config.norm_eps == 1e-6 and model.config.tie_embeddings is tie
    tokens = random_tokens(model.config.vocab_size)
    with torch.no_grad():
        expected = hf_model(tokens).logits
    assert expected.abs().max() > 1.0
    assert (our_logits(model, tokens) - expected).abs().max() <= 1e-5
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 0 and state["tokens_seen"] == 0
    assert state["tokenizer_fingerprint"] == Tokenizer.load(checkpoint / "tokenizer.json").fingerprint


BASE_HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                  "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4}


@pytest.mark.parametrize("change,message", [
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}, "rope_type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"head_dim": 16}, "head_dim 16 != hidden_size // num_attention_heads = 8"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "only model_type 'llama'"),
], ids=["attention_bias", "mlp_bias", "llama3-rope", "linear-rope", "head_dim", "gelu", "mistral"])
def test_unsupported_transformers_configs_are_refused(tmp_path, change, message):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**BASE_HF_CONFIG, **change}))
    with pytest.raises(ExportError, match=message):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_export_import_export_gives_identical_files(tokenizer_dir, tmp_path):
    model = random_model(padded_vocab(tokenizer_dir), tie=True)
    first = export_checkpoint(write_checkpoint(tmp_path / "run", model, tokenizer_dir), tmp_path / "first")
    second = export_checkpoint(import_hf(first, tmp_path / "imported"), tmp_path / "second")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_text() == (second / name).read_text(), name


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_export_and_import(tokenizer_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_checkpoint(run_dir, random_model(padded_vocab(tokenizer_dir)), tokenizer_dir)
    assert main(["export", str(run_dir), str(tmp_path / "hf"), "--dtype", "bf16", "--trim-vocab"]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "with its tokenizer.json" in capsys.readouterr().out
    assert (tmp_path / "back" / "model.safetensors").exists()


def test_cli_export_of_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and err.count("\n") == 1


def user_folder(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_cli_export_refuses_a_folder_that_is_not_empty_and_force_keeps_the_users_other_files(tokenizer_dir, tmp_path,
                                                                                              capsys):
    checkpoint = write_checkpoint(tmp_path / "run", random_model(padded_vocab(tokenizer_dir)), tokenizer_dir)
    model_dir = user_folder(tmp_path / "my-model", {"config.json": '{"mine": 1}', "notes.txt": "keep me"})
    assert main(["export", str(checkpoint), str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "is not empty (config.json, notes.txt)" in err and "--force" in err and err.count("\n") == 1
    assert (model_dir / "config.json").read_text() == '{"mine": 1}' and sorted(p.name for p in model_dir.iterdir()) \
        == ["config.json", "notes.txt"]

    assert main(["export", str(checkpoint), str(model_dir), "--force"]) == 0
    assert (model_dir / "notes.txt").read_text() == "keep me"
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
    assert not (tmp_path / ".tmp_my-model").exists()
    exported = hf_logits(model_dir, random_tokens(300))
    assert torch.allclose(exported, hf_logits(export_checkpoint(checkpoint, tmp_path / "fresh"), random_tokens(300)))


def test_cli_import_refuses_an_existing_checkpoint_and_force_keeps_files_it_does_not_write(tokenizer_dir, tmp_path,
                                                                                          capsys):
    hf_dir = export_checkpoint(write_checkpoint(tmp_path / "run", random_model(padded_vocab(tokenizer_dir)),
                                                tokenizer_dir), tmp_path / "hf")
    in_run = write_checkpoint(tmp_path / "other", random_model(padded_vocab(tokenizer_dir), seed=3), tokenizer_dir)
    before = {p.name: p.read_bytes() for p in in_run.iterdir()}
    # A training run's checkpoint is another llamalite artifact: refused even with --force (docs/safety.md)
    assert main(["import", str(hf_dir), str(in_run), "--force"]) == 2
    err = capsys.readouterr().err
    assert "is inside" in err and "run directory" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in in_run.iterdir()} == before

    trained = shutil.copytree(in_run, tmp_path / "standalone")  # a checkpoint outside any run: --force may replace it
    assert main(["import", str(hf_dir), str(trained)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--force" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before

    (trained / "notes.txt").write_text("keep me")
    torch.save({"state": {}, "param_groups": []}, trained / "optimizer.pt")  # not the import's: must not be read
    assert main(["import", str(hf_dir), str(trained), "--force"]) == 0
    assert (trained / "notes.txt").read_text() == "keep me"
    loaded = load_for_inference(trained)
    reference = load_for_inference(import_hf(hf_dir, tmp_path / "fresh"))
    tokens = random_tokens(300)
    assert torch.equal(our_logits(loaded.model, tokens), our_logits(reference.model, tokens))
    assert load_checkpoint(trained).optimizer is None  # optimizer.pt is not listed in the import's checksums


def test_force_refuses_to_leave_old_weights_that_loaders_would_take_for_the_new_ones(tokenizer_dir, tmp_path,
                                                                                     capsys):
    checkpoint = write_checkpoint(tmp_path / "run", random_model(padded_vocab(tokenizer_dir)), tokenizer_dir)
    export_dir = export_checkpoint(checkpoint, tmp_path / "hf")  # one model.safetensors
    assert main(["export", str(checkpoint), str(export_dir), "--force", "--shard-size", "20KB"]) == 2
    err = capsys.readouterr().err
    assert "holds model.safetensors, which this command would not replace" in err and err.count("\n") == 1
    assert not (tmp_path / ".tmp_hf").exists() and not (export_dir / "model.safetensors.index.json").exists()

    sharded_checkpoint = user_folder(tmp_path / "fsdp-step", {"notes.txt": "mine"})
    (sharded_checkpoint / "dcp").mkdir()
    (sharded_checkpoint / "dcp" / ".metadata").write_bytes(b"shards")
    assert main(["import", str(export_dir), str(sharded_checkpoint), "--force"]) == 2
    assert "holds dcp, which this command would not replace" in capsys.readouterr().err
    assert sorted(p.name for p in sharded_checkpoint.iterdir()) == ["dcp", "notes.txt"]


# ------------------------------------------------------------------------------------------------ lm_eval
LM_EVAL_TASK = """task: llamalite_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness is not installed")
def test_lm_eval_runs_on_the_export(tokenizer_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = export_checkpoint(write_checkpoint(tmp_path / "run", random_model(padded_vocab(tokenizer_dir)),
                                             tokenizer_dir),
                            tmp_path / "hf")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"question": "the king and the", "choices": [" queen", " night"], "label": 0},
            {"question": "come now, go", "choices": [" now", " sword"], "label": 0}]
    (tasks / "toy.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (tasks / "llamalite_toy.yaml").write_text(LM_EVAL_TASK.format(data=tasks / "toy.jsonl"))
    results = simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32", tasks=["llamalite_toy"],
                              task_manager=TaskManager(include_path=str(tasks)), device="cpu", batch_size=2)
    assert 0.0 <= results["results"]["llamalite_toy"]["acc,none"] <= 1.0


def test_a_bos_adding_import_feeds_generate_what_transformers_does_and_exports_its_rule(tmp_path):
    from llamalite.generate import SamplingOptions, generate
    from tests.bos_models import bos_transformers_folder, small_bpe_with_bos

    hf_dir = bos_transformers_folder(tmp_path / "hf", small_bpe_with_bos(SENTENCES * 10), max_seq_len=64)
    checkpoint = import_hf(hf_dir, tmp_path / "imported")
    loaded = load_for_inference(checkpoint)
    tokenizer = loaded.tokenizer
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["bos"] == {"token": "<s>", "id": tokenizer.token_to_id("<s>"), "prepended": True}
    assert loaded.config.tokenizer.bos_token == "<s>" and tokenizer.prepends_bos

    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    prompt_ids = theirs(TEXT, return_tensors="pt").input_ids
    assert prompt_ids[0, 0].item() == tokenizer.bos_id
    expected = hf_model.generate(prompt_ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_id,
                                 pad_token_id=tokenizer.eos_id)[0, prompt_ids.shape[1]:].tolist()
    result = generate(loaded.model, tokenizer, [TEXT], SamplingOptions(max_new_tokens=12, temperature=0.0))[0]
    assert result.prompt_tokens == prompt_ids[0].tolist()
    assert result.tokens == expected

    out = export_checkpoint(checkpoint, tmp_path / "again")
    settings = json.loads((out / "tokenizer_config.json").read_text())
    assert settings["bos_token"] == "<s>" and settings["add_bos_token"] is True
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == tokenizer.bos_id
    assert transformers.AutoTokenizer.from_pretrained(out)(TEXT).input_ids == prompt_ids[0].tolist()
