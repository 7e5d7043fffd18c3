import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamalite.checkpoint.format import list_checkpoints, write_checkpoint_dir
from llamalite.checkpoint.inference import load_for_inference
from llamalite.cli import main
from llamalite.config import Config, ModelConfig, save_config
from llamalite.data.sft import Example, make_rows
from llamalite.export.hf import export_checkpoint
from llamalite.model.llama import Llama
from llamalite.model.lora import load_adapter
from llamalite.sft import SFTTrainer, answer_prompts, merge
from llamalite.tokenizer import Tokenizer

pytest.importorskip("peft")

WORDS = "red green blue cat dog sun moon tree star fish".split()


def toy_records(count: int, seed: int = 0) -> list[dict]:
    """The toy task: repeat one to three words."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        records.append({"instruction": f"repeat: {words}", "input": "", "output": words})
    return records


@pytest.fixture(scope="module")
def toy_tokenizer() -> Tokenizer:
    texts = [r["instruction"] + "\n" + r["output"] for r in toy_records(200)]
    return Tokenizer.train(texts, vocab_size=300)


def make_base(folder: Path, tokenizer: Tokenizer, seed: int = 0, **model) -> Path:
    """A randomly initialised checkpoint with its tokenizer: what `sft.base` points at."""
    torch.manual_seed(seed)
    config = Config(name="base", model=ModelConfig(vocab_size=tokenizer.padded_vocab_size(64), **{
        **dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128, max_seq_len=48), **model}))
    config.data.out_dir = str(folder / "no-data")
    tokenizer_file = folder / "tokenizer.json"
    tokenizer.save(tokenizer_file)
    state = {"step": 0, "tokens_seen": 0, "config": config.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint}
    return write_checkpoint_dir(folder / "base", Llama(config.model), None, state,
                                extra_files={"tokenizer.json": tokenizer_file})


def sft_config(base: Path, data: Path, run_dir: Path, method: str = "lora", **train) -> Config:
    config = Config(name="sft")
    config.sft.base, config.sft.data, config.sft.template = str(base), str(data), "plain"
    config.sft.method, config.sft.val_fraction = method, 0.1
    config.sft.lora.r, config.sft.lora.alpha, config.sft.lora.dropout = 4, 8.0, 0.0
    config.optim.lr, config.optim.min_lr, config.optim.warmup_steps, config.optim.weight_decay = 3e-3, 3e-4, 5, 0.0
    defaults = dict(run_dir=str(run_dir), dtype="fp32", batch_tokens=8 * 32, micro_batch_size=4, seq_len=32,
                    max_steps=6, eval_interval=3, val_batches=2, log_interval=1, progress=False)
    for key, value in {**defaults, **train}.items():
        setattr(config.train, key, value)
    return config


@pytest.fixture
def toy_setup(tmp_path, toy_tokenizer):
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(toy_records(400)))
    return make_base(tmp_path, toy_tokenizer), data


def test_packed_examples_cannot_attend_to_each_other():
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64,
                              max_seq_len=32)).eval()
    a = Example(list(range(1, 11)), [False] * 5 + [True] * 5)
    b = Example(list(range(20, 31)), [False] * 4 + [True] * 7)
    b_changed = Example(list(range(40, 51)), b.mask)
    a_changed = Example([7] * 10, a.mask)

    def packed_logits(first, second):
        batch = make_rows([[first, second]], seq_len=24, pad_id=0, packed=True)
        return model(batch.inputs, positions=batch.positions, attn_mask=batch.attention_mask())[0]

    with torch.no_grad():
        reference = packed_logits(a, b)
        alone_a = model(torch.tensor([a.ids[:-1]]))[0]
        alone_b = model(torch.tensor([b.ids[:-1]]))[0]
        torch.testing.assert_close(reference[:9], alone_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reference[9:19], alone_b, atol=1e-5, rtol=1e-5)
        # A change in one example leaves the other's logits unchanged, in either order.
        torch.testing.assert_close(packed_logits(a, b_changed)[:9], reference[:9], atol=0, rtol=0)
        torch.testing.assert_close(packed_logits(a_changed, b)[9:19], reference[9:19], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(packed_logits(a_changed, b)[:9], reference[:9])


def test_lora_sft_trains_only_adapters_and_merge_gives_the_same_logits(toy_setup, tmp_path):
    base, data = toy_setup
    result = SFTTrainer(sft_config(base, data, tmp_path / "run", max_steps=8)).fit()
    assert result.val_losses[-1][1] < result.val_losses[0][1]
    saved = load_file(list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "model.safetensors")
    base_tensors = load_file(base / "model.safetensors")
    assert torch.equal(saved["layers.0.self_attn.q_proj.base_layer.weight"],
                       base_tensors["layers.0.self_attn.q_proj.weight"])
    assert saved["layers.0.self_attn.q_proj.lora_B.default.weight"].abs().sum() > 0
    report = json.loads((tmp_path / "run" / "sft_data.json").read_text())
    assert report["train"] + report["val"] == 400

    adapted = load_for_inference(tmp_path / "run").model
    merged_dir = merge(tmp_path / "run", tmp_path / "merged", adapter_out=tmp_path / "adapter")
    merged = load_for_inference(merged_dir)
    tokens = torch.tensor([merged.tokenizer.encode("repeat: red cat\nred cat")])
    with torch.no_grad():
        expected = adapted(tokens)
        torch.testing.assert_close(merged.model(tokens), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(Llama(merged.model.config).eval()(tokens), expected)
        # eval, generate and chat open the LoRA run itself too, adapters applied.
        torch.testing.assert_close(load_for_inference(tmp_path / "run").model(tokens), expected, atol=1e-5, rtol=1e-5)
    # The adapter in PEFT format, read back onto our base, gives the same logits.
    with_adapter = load_adapter(load_for_inference(base).model, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(tokens), expected, atol=1e-5, rtol=1e-5)


def test_peft_loads_the_adapter_onto_the_transformers_export_of_the_base(toy_setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    import peft

    base, data = toy_setup
    SFTTrainer(sft_config(base, data, tmp_path / "run", max_steps=2, eval_interval=0)).fit()
    merge(tmp_path / "run", tmp_path / "merged", adapter_out=tmp_path / "adapter", adapter_base="hf-base")
    assert load_file(tmp_path / "adapter" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum() > 0
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "hf-base"
    hf_base, hf_merged = export_checkpoint(base, tmp_path / "hf-base"), export_checkpoint(tmp_path / "merged",
                                                                                         tmp_path / "hf-merged")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an adapter name that matches no module is only a warning in peft
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, seen by peft
        adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf_base),
                                                 str(tmp_path / "adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(hf_merged).eval()
    tokens = torch.tensor([load_for_inference(base).tokenizer.encode("repeat: red cat\nred cat")])
    with torch.no_grad():
        expected = merged(tokens).logits
        torch.testing.assert_close(adapted(tokens).logits, expected, atol=1e-5, rtol=1e-5)
        plain = transformers.AutoModelForCausalLM.from_pretrained(hf_base).eval()
        assert not torch.allclose(plain(tokens).logits, expected, atol=1e-4)  # the adapters do change the logits


def test_short_sft_on_a_toy_task_learns_to_answer_and_stop(toy_setup, tmp_path):
    base, data = toy_setup
    config = sft_config(base, data, tmp_path / "run", method="full", max_steps=100, eval_interval=0,
                        batch_tokens=16 * 32, micro_batch_size=16)
    config.optim.lr, config.optim.min_lr = 1e-2, 1e-3
    trainer = SFTTrainer(config)
    questions = [f"repeat: {w}" for w in ("sun moon", "fish", "red tree star")]
    before = answer_prompts(trainer.model.eval(), trainer.tokenizer, trainer.template, questions, 12)
    trainer.fit()
    after = answer_prompts(trainer.model.eval(), trainer.tokenizer, trainer.template, questions, 12)
    assert not all(a.ended_with_eos for a in before)
    assert all(a.ended_with_eos for a in after), [(a.text, a.finish_reason) for a in after]
    assert all(set(a.text.split()) <= set(WORDS) for a in after), [a.text for a in after]  # answers in the task's words


@pytest.mark.parametrize("method, packing", [("lora", True), ("full", False)])
def test_resumed_sft_run_continues_exactly(toy_setup, tmp_path, method, packing):
    base, data = toy_setup

    def config(run: str, **train) -> Config:
        config = sft_config(base, data, tmp_path / run, method, eval_interval=0, **train)
        config.sft.packing = packing
        config.sft.lora.dropout = 0.1  # its RNG must be restored too
        return config

    straight = SFTTrainer(config("straight")).fit()
    first = SFTTrainer(config("resumed", stop_at_step=3)).fit()
    assert first.steps == 3
    resumed = SFTTrainer(config("resumed")).fit()
    assert resumed.steps == straight.steps == 6

    def final(run: str) -> tuple[bytes, dict]:
        checkpoint = list_checkpoints(tmp_path / run / "checkpoints")[-1]
        return ((checkpoint / "model.safetensors").read_bytes(),
                torch.load(checkpoint / "optimizer.pt", weights_only=True))

    (weights_a, optim_a), (weights_b, optim_b) = final("straight"), final("resumed")
    assert weights_a == weights_b
    for key, state in optim_a["state"].items():
        assert torch.equal(state["exp_avg"], optim_b["state"][key]["exp_avg"])


def test_sft_and_merge_commands(toy_setup, tmp_path):
    base, data = toy_setup
    config_file = tmp_path / "sft.yaml"
    save_config(sft_config(base, data, tmp_path / "run", max_steps=2, eval_interval=0), config_file)
    assert main(["sft", str(config_file)]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2  # LoRA weights: merge first
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    assert load_for_inference(tmp_path / "merged").model.config.n_layer == 2
    assert main(["export", str(tmp_path / "merged"), str(tmp_path / "hf")]) == 0
    assert main(["sft", str(config_file), "sft.template=chatm"]) == 2  # unknown template: a one-line error


def test_merge_refuses_a_folder_that_is_not_empty_and_sft_holds_its_run_directory(toy_setup, tmp_path, capsys):
    from llamalite.errors import BusyError
    from llamalite.files import folder_lock

    base, data = toy_setup
    config = sft_config(base, data, tmp_path / "run", max_steps=2, eval_interval=0)
    with folder_lock(tmp_path / "run", "trained"):
        with pytest.raises(BusyError, match="is being trained by process"):
            SFTTrainer(config).fit()
    assert not (tmp_path / "run" / "sft_data.json").exists()  # nothing written into a folder another process holds
    SFTTrainer(config).fit()
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "notes.txt").write_text("mine")
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 2
    assert "is not empty (notes.txt)" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged"), "--force"]) == 0
    assert (tmp_path / "merged" / "notes.txt").read_text() == "mine"
    assert load_for_inference(tmp_path / "merged").model.config.n_layer == 2


def test_a_damaged_base_checkpoint_is_refused_naming_the_file(toy_setup, tmp_path, capsys):
    base, data = toy_setup
    weights = base / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-10] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    config_file = tmp_path / "sft.yaml"
    save_config(sft_config(base, data, tmp_path / "run", max_steps=2), config_file)
    assert main(["sft", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights} does not match its checksum" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained on the damaged weights
