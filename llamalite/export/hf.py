"""To and from transformers' LlamaForCausalLM, with identical logits.

`export_checkpoint` turns a llamalite checkpoint into a folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load with no code of ours: config.json, safetensors weights (sharded above a size,
with model.safetensors.index.json), tokenizer.json + tokenizer_config.json, generation_config.json, README.md.
`import_hf` turns a local Llama-architecture folder in transformers format back into a checkpoint directory.
Neither needs transformers installed: both read and write its files directly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from llamalite import __version__
from llamalite.checkpoint.format import load_model_tensors, model_tensors, temp_dir_of, write_checkpoint_dir
from llamalite.checkpoint.inference import load_for_inference
from llamalite.config import Config, config_from_dict
from llamalite.data.sft import jinja_template, trained_template
from llamalite.errors import ConfigError, ExportError
from llamalite.files import claim_output, move_into, read_jsonl
from llamalite.model.llama import Llama, ModelConfig, hf_name, name_from_hf
from llamalite.model.weights_file import read_safetensors
from llamalite.records import contained_path, expect_type, fields_of, read_json
from llamalite.tokenizer import Tokenizer

DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IMPORT_FIX = "pass a transformers model folder saved with save_pretrained(..., safe_serialization=True)"
HF_SIZES = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings")
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# LlamaConfig's defaults, for keys a config.json leaves out.
HF_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": False, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}
IMPORTABLE = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}  # model_type -> its architecture
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# What transformers reads as a folder's weights (a single file before an index; safetensors before .bin)
HF_WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")


# ================================================================================================= export
def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    dtype: str = "fp32",
    trim_vocab: bool = False,
    shard_size: str = "5GB",
    tokenizer_path: Path | None = None,
    force: bool = False,
) -> Path:
    """Write `checkpoint` (a checkpoint directory, or a run directory: its newest checkpoint) as a transformers
    folder. out_dir must be new or empty unless `force`: then files of other names in it are kept."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    max_shard_bytes = parse_size(shard_size)
    claim = claim_output(out_dir, "hf-export", "the export", inputs=(checkpoint, tokenizer_path), force=force)
    loaded = load_for_inference(checkpoint, tokenizer_path, allow_lora=False)  # LoRA: `llamalite merge` first
    checkpoint, state, tokenizer, model = loaded.path, loaded.state, loaded.tokenizer, loaded.model
    check_exportable(model.config)
    vocab_size = tokenizer.size if trim_vocab else model.config.vocab_size
    torch_dtype, dtype_name = DTYPES[dtype]
    special = special_tokens(state, tokenizer)

    with claim.writing(), claim.temp_dir() as tmp:  # a failure leaves neither the temporary nor a new out_dir
        save_weights(hf_tensors(model, vocab_size, torch_dtype), tmp, max_shard_bytes)
        write_json(tmp / "config.json", hf_config(model.config, vocab_size, dtype_name, special))
        write_json(tmp / "generation_config.json",
                   {key: special[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")})
        tokenizer.save(tmp / "tokenizer.json")
        write_json(tmp / "tokenizer_config.json",
                   tokenizer_config(special, tokenizer, model.config.max_seq_len, state["config"]))
        (tmp / "README.md").write_text(model_card(checkpoint, state, model, vocab_size, dtype_name))
        move_into(tmp, out_dir, weights=HF_WEIGHT_FILES)
    return out_dir


def check_exportable(config: ModelConfig) -> None:
    """Refuse a model that no transformers architecture computes the same way."""
    if config.logit_softcap is not None:
        raise ExportError(f"model.logit_softcap={config.logit_softcap} has no equivalent in LlamaForCausalLM or "
                          "Qwen3ForCausalLM, so an export would give other logits: train with model.logit_softcap=null "
                          "to export (docs/recipes.md)")


def special_tokens(state: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """bos/eos/unk/pad tokens and ids: all the end-of-text token (GPT-2's convention) unless the tokenizer has its
    own BOS (put before every text, or declared by tokenizer.bos_token) or an import recorded others."""
    recorded = state.get("special_tokens") or {}
    special: dict[str, Any] = {}
    for name in SPECIAL_TOKENS:
        token = recorded.get(name) or tokenizer.eos_token
        special[name] = token
        special[f"{name}_id"] = tokenizer.token_to_id(token)
    special["eos_token"], special["eos_token_id"] = tokenizer.eos_token, tokenizer.eos_id
    if tokenizer.bos_id != tokenizer.eos_id:
        special["bos_token"], special["bos_token_id"] = tokenizer.bos_token, tokenizer.bos_id
    return special


def hf_tensors(model: Llama, vocab_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """transformers' names (`model.` prefix, a tied lm_head omitted), vocabulary rows cut to vocab_size, cast."""
    tensors = {}
    for name, tensor in model_tensors(model).items():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[:vocab_size]
        tensors[hf_name(name)] = tensor.to(dtype).contiguous()
    return tensors


def save_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    """One model.safetensors, or shards of at most max_shard_bytes (a bigger tensor gets its own) plus an index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out_dir / SINGLE_FILE, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / filename, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(out_dir / INDEX_FILE,
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, '1000' -> 1000 bytes (transformers' convention)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in SIZE_UNITS or not 1 <= float(match.group(1)) * SIZE_UNITS[unit] < 2**63:  # NaN/inf: no match
        raise ExportError(f"shard size {str(text)[:40]!r} is not a size: write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def hf_config(config: ModelConfig, vocab_size: int, dtype_name: str, special: dict[str, Any]) -> dict[str, Any]:
    """What LlamaConfig.save_pretrained writes, plus the keys transformers 4 reads (rope_theta, torch_dtype).

    A model with QK-norm becomes a Qwen3 model: Qwen3 is LLaMA plus an RMSNorm on each head's queries and keys."""
    architecture = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
                    "sliding_window": None} if config.qk_norm else \
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False, "pretraining_tp": 1}
    return {
        **architecture,
        "vocab_size": vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "use_cache": True,
        "bos_token_id": special["bos_token_id"],
        "eos_token_id": special["eos_token_id"],
        "pad_token_id": special["pad_token_id"],
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def tokenizer_config(special: dict[str, Any], tokenizer: Tokenizer, max_seq_len: int,
                     config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json. Whether a BOS goes before every text is tokenizer.json's post-processor (what
    transformers 5 reads); add_bos_token says the same for the readers that take it from here."""
    result = {"tokenizer_class": "PreTrainedTokenizerFast", **{name: special[name] for name in SPECIAL_TOKENS},
              "add_bos_token": tokenizer.prepends_bos, "add_eos_token": False,
              "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}
    template = trained_template(config)  # a fine-tuned model's training template; none for a pretrained one
    if template is not None:
        result["chat_template"] = jinja_template(template, bos=tokenizer.prepends_bos)
    return result


def model_card(checkpoint: Path, state: dict[str, Any], model: Llama, vocab_size: int, dtype_name: str) -> str:
    config, name = model.config, state["config"].get("name", checkpoint.name)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    rows = [
        ("parameters", f"{model.num_parameters():,}"),
        ("layers / hidden / ffn", f"{config.n_layer} / {config.d_model} / {config.ffn_hidden}"),
        ("heads / kv heads", f"{config.n_head} / {config.n_kv_head}"),
        ("vocabulary / context", f"{vocab_size} / {config.max_seq_len}"),
        ("embeddings", "tied" if config.tie_embeddings else "untied"),
        ("weights", dtype_name),
        ("training steps", f"{state['step']:,}"),
        ("training tokens", f"{state['tokens_seen']:,}"),
        ("final validation loss", final_val_loss(run_dir, state["step"])),
    ]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [llamalite, llama]", "---", "",
        f"# {name}", "",
        f"{origin(state)}, exported from `{checkpoint.name}` by llamalite {__version__}.", "",
        "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), "",
        "## Evaluations", "", *eval_table(run_dir, state["step"]), "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))", "```", "",
    ]
    return "\n".join(lines)


def origin(state: dict[str, Any]) -> str:
    if state.get("imported_from"):
        return f"A LLaMA-style language model imported into llamalite from `{state['imported_from']}`"
    return f"A LLaMA-style language model trained with llamalite {state.get('code_version', '')}".rstrip()


def final_val_loss(run_dir: Path | None, step: int) -> str:
    rows = [r for r in _stepped(read_jsonl(run_dir / "metrics.jsonl"))
            if isinstance(r.get("val/loss"), (int, float)) and r["step"] <= step] if run_dir else []
    return f"{rows[-1]['val/loss']:.4f} (step {rows[-1]['step']:,})" if rows else "none recorded"


def eval_table(run_dir: Path | None, step: int) -> list[str]:
    """evals.jsonl's benchmark results as a Markdown table with standard errors: those of the exported step if it
    was evaluated, else those of the newest evaluated step (records carry `eval/<task>/<metric>` under "metrics")."""
    records = [r for r in _stepped(read_jsonl(run_dir / "evals.jsonl") if run_dir else []) if _benchmarks(r)]
    if not records:
        return ["None recorded (no benchmark results in the run's evals.jsonl)."]
    steps = {r.get("step", 0) for r in records}
    shown = step if step in steps else max(steps)
    metrics: dict[str, float] = {}
    for record in sorted(records, key=lambda r: r.get("time", 0)):  # a later evaluation of the step wins
        if record.get("step", 0) == shown:
            metrics.update(_benchmarks(record))
    limits = {r.get("limit") if isinstance(r.get("limit"), int) else None for r in records if r["step"] == shown}
    which = "the exported checkpoint" if shown == step else f"the newest evaluated step; step {step:,} has none"
    subset = "" if limits == {None} else f", on the first {max(x or 0 for x in limits)} examples of each task at most"
    lines = [f"At step {shown:,} ({which}{subset}), zero-shot, scored as lm-evaluation-harness does:", "",
             "| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for key, value in metrics.items():
        if key.endswith("_stderr"):
            continue
        task, _, metric = key.removeprefix("eval/").rpartition("/")
        lines.append(f"| {task} | {metric} | {value:.4f} | {_stderr_cell(metrics.get(key + '_stderr'))} |")
    return lines


def _stepped(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run records with an integer step, for a step-ordered table (a damaged record is left out, not fatal)."""
    return [r for r in records if isinstance(r.get("step"), int) and isinstance(r.get("time", 0), (int, float))]


def _benchmarks(record: dict[str, Any]) -> dict[str, float]:
    metrics = record.get("metrics")
    return {k: v for k, v in (metrics.items() if isinstance(metrics, dict) else ())
            if k.startswith("eval/") and isinstance(v, (int, float))}


def _stderr_cell(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"  # none, or NaN (one example)


# ================================================================================================= import
def import_hf(hf_dir: Path, out_dir: Path, force: bool = False) -> Path:
    """Convert a local transformers Llama folder (config.json + safetensors) into a llamalite checkpoint at out_dir,
    which must be new or empty unless `force` (then files of other names in it are kept)."""
    hf_config_file = hf_dir / "config.json"
    if not hf_config_file.is_file():
        raise ExportError(f"{hf_config_file} not found: pass a transformers model folder (config.json + *.safetensors)")
    claim = claim_output(out_dir, "checkpoint", "the imported checkpoint", inputs=(hf_dir,), force=force)
    hf = {**HF_DEFAULTS, **read_json(hf_config_file, "the transformers config", IMPORT_FIX, error=ExportError)}
    with fields_of(str(hf_config_file), IMPORT_FIX, error=ExportError):
        check_hf_numbers(hf)
        check_supported(hf)
        model_config = model_config_from_hf(hf, str(hf_config_file))
    model_config.validate()
    model = Llama(model_config)
    load_model_tensors(model, checked_tensors(model, read_hf_tensors(hf_dir)))

    config = Config(name=hf_dir.name, model=model.config)
    tokenizer_file = hf_dir / "tokenizer.json"
    if tokenizer_file.exists() and not tokenizer_file.is_file():
        raise ExportError(f"{tokenizer_file} is not a file: put the model's tokenizer.json there, or remove it to "
                          "import the model without a tokenizer")
    tokenizer, special = None, {}
    if tokenizer_file.is_file():
        special = hf_special_tokens(hf_dir, hf, tokenizer_file)
        tokenizer = Tokenizer.load(tokenizer_file, special["eos_token"], special["bos_token"])
        config.tokenizer.eos_token = tokenizer.eos_token
        config.tokenizer.bos_token = special["bos_token"] if tokenizer.bos_id != tokenizer.eos_id else None
        config.tokenizer.path = str(out_dir / "tokenizer.json")
    state = {
        "step": 0,
        "tokens_seen": 0,
        "world_size": 1,
        "tokenizer_fingerprint": tokenizer.fingerprint if tokenizer else None,
        "bos": tokenizer.bos_record() if tokenizer else None,
        "config": config.to_dict(),
        "code_version": __version__,
        "imported_from": str(hf_dir),
        "special_tokens": special,
    }
    extra = {"tokenizer.json": tokenizer_file} if tokenizer else {}
    with claim.writing(temporaries=(temp_dir_of(out_dir),)):
        return write_checkpoint_dir(out_dir, model, None, state, extra_files=extra, keep_other_files=True)


def check_supported(hf: dict[str, Any]) -> None:
    """Refuse what our model does not compute the same way."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or [IMPORTABLE.get(model_type, "LlamaForCausalLM")]
    if model_type not in IMPORTABLE or architectures != [IMPORTABLE[model_type]]:
        raise ExportError(f"model_type {model_type!r} / architectures {architectures} is not supported: "
                          "only model_type 'llama' (LlamaForCausalLM) or 'qwen3' (Qwen3ForCausalLM) can be imported")
    if hf.get("use_sliding_window"):
        raise ExportError("use_sliding_window=true is not supported: llamalite attends over the whole context")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ExportError(f"{key}=true is not supported: llamalite's Llama has no bias terms")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ExportError(f"{key} with rope_type {rope_type!r} is not supported: "
                              "llamalite implements only default (unscaled) RoPE")
    if hf["hidden_act"] != "silu":
        raise ExportError(f"hidden_act {hf['hidden_act']!r} is not supported: llamalite's MLP is SwiGLU (silu)")
    expected_head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, expected_head_dim):
        raise ExportError(f"head_dim {hf['head_dim']} != hidden_size // num_attention_heads = {expected_head_dim} "
                          "is not supported: llamalite derives head_dim from d_model and n_head")


def check_hf_numbers(hf: dict[str, Any]) -> None:
    """The sizes of a transformers config are positive integers (TypeError / ValueError, turned into one line)."""
    for key in HF_SIZES:
        value = hf.get(key)
        if value is None and key == "num_key_value_heads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} is {value!r}, not a positive integer")
    for key in ("rope_theta", "rms_norm_eps"):
        value = hf.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{key} is {value!r}, not a positive number")


def hf_weight_files(hf_dir: Path) -> list[str]:
    """The shard files model.safetensors.index.json lists: files inside hf_dir, each once."""
    index_file = hf_dir / INDEX_FILE
    index = read_json(index_file, "the weight index", IMPORT_FIX, error=ExportError)
    weight_map = expect_type(index.get("weight_map"), dict, f"{index_file} field weight_map", IMPORT_FIX, ExportError)
    names = sorted({expect_type(name, str, f"{index_file} weight_map entry", IMPORT_FIX, ExportError)
                    for name in weight_map.values()})
    if not names:
        raise ExportError(f"{index_file} lists no weight files: {IMPORT_FIX}")
    for name in names:
        contained_path(hf_dir, name, f"{index_file} weight_map", IMPORT_FIX, ExportError)
    return names


# ModelConfig's key -> the key of a transformers config.json that gives its value
HF_KEYS = {"vocab_size": "vocab_size", "n_layer": "num_hidden_layers", "d_model": "hidden_size",
           "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "ffn_hidden": "intermediate_size",
           "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
           "tie_embeddings": "tie_word_embeddings", "init_std": "initializer_range"}


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The model config of a transformers config, through the same type and range checks as every llamalite config
    (config_from_dict): a value out of range is one ExportError naming the config.json key."""
    rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf["rope_theta"])
    raw = {
        "vocab_size": hf["vocab_size"],
        "n_layer": hf["num_hidden_layers"],
        "d_model": hf["hidden_size"],
        "n_head": hf["num_attention_heads"],
        "n_kv_head": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "ffn_hidden": hf["intermediate_size"],
        "max_seq_len": hf["max_position_embeddings"],
        "rope_theta": rope_theta,
        "norm_eps": hf["rms_norm_eps"],
        "tie_embeddings": hf["tie_word_embeddings"],
        "init_std": hf.get("initializer_range", ModelConfig.init_std),
        "qk_norm": hf.get("model_type") == "qwen3",
    }
    try:
        return config_from_dict({"model": raw}).model
    except ConfigError as exc:
        message = str(exc)
        for ours, theirs in HF_KEYS.items():
            message = re.sub(rf"\bmodel\.{ours}\b", theirs, message)
        raise ExportError(f"{source}: {message} (llamalite cannot hold this model: fix the value or import another "
                          "model)") from None


def read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors or of the shards model.safetensors.index.json lists, under our names."""
    if (hf_dir / INDEX_FILE).is_file():
        files = hf_weight_files(hf_dir)
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    elif any(hf_dir.glob("pytorch_model*.bin")):  # pickle weights: never unpickled, they could run code
        raise ExportError(f"{hf_dir} holds only pickle weights (pytorch_model*.bin), which llamalite never loads "
                          "(unpickling can run code): convert them with save_pretrained(..., "
                          "safe_serialization=True) where you trust their source, then import that folder")
    else:
        raise ExportError(f"{hf_dir} has no {SINGLE_FILE} or {INDEX_FILE}: save the model with "
                          "save_pretrained(..., safe_serialization=True) first")
    tensors = {}
    for filename in files:
        for name, tensor in read_safetensors(hf_dir / filename, ExportError, IMPORT_FIX).items():
            if not name.endswith("rotary_emb.inv_freq"):  # a buffer old transformers versions saved
                tensors[name_from_hf(name)] = tensor
    return tensors


def checked_tensors(model: Llama, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the model needs, after checking that names and shapes match (a tied lm_head is dropped)."""
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
    if missing or unexpected:
        raise ExportError(f"the weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                          "check that config.json belongs to these safetensors files")
    for name, tensor in expected.items():
        if tensors[name].shape != tensor.shape:
            raise ExportError(f"{name} has shape {tuple(tensors[name].shape)} "
                              f"but the config implies {tuple(tensor.shape)}: "
                              "check that config.json belongs to these safetensors files")
    return {name: tensors[name] for name in expected}


def hf_special_tokens(hf_dir: Path, hf: dict[str, Any], tokenizer_file: Path) -> dict[str, str | None]:
    """bos/eos/unk/pad tokens from tokenizer_config.json, falling back to config.json's ids."""
    tokenizer_config_file = hf_dir / "tokenizer_config.json"
    declared = (read_json(tokenizer_config_file, "the tokenizer config", IMPORT_FIX, error=ExportError)
                if tokenizer_config_file.is_file() else {})
    try:
        inner = HFTokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception with the serde message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(f"{tokenizer_file} is not a valid tokenizer.json ({reason[:160]}): {IMPORT_FIX}") from None
    special: dict[str, str | None] = {}
    for name in SPECIAL_TOKENS:
        token = declared.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if token is None and name in ("bos_token", "eos_token") and hf.get(f"{name}_id") is not None:
            token_id = hf[f"{name}_id"]
            token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ExportError(f"{hf_dir / 'config.json'} has {name}_id {hf[f'{name}_id']!r}, not a token id: "
                                  f"{IMPORT_FIX}")
            token = inner.id_to_token(token_id)
        if token is not None and not isinstance(token, str):
            raise ExportError(f"{hf_dir} gives {name} as {token!r}, not a string: {IMPORT_FIX}")
        special[name] = token
    if special["eos_token"] is None:
        raise ExportError(f"{hf_dir} names no end-of-text token (tokenizer_config.json eos_token or config.json "
                          "eos_token_id): add one to tokenizer_config.json")
    return special


# ================================================================================================= helpers
def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
