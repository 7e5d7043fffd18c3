"""The `llamalite` command: one subcommand per stage, each a thin call into its module."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llamalite.config import ConfigError, load_config


def cmd_model_info(args: argparse.Namespace) -> None:
    from llamalite.model.presets import count_parameters, get_preset, matmul_parameters, training_flops_per_token

    config = get_preset(args.preset)
    seq_len = args.seq_len or config.max_seq_len
    params = count_parameters(config)
    embedding = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    train_flops = training_flops_per_token(config, seq_len)
    rows = [
        ("preset", args.preset),
        ("parameters", f"{params:,}"),
        ("non-embedding", f"{params - embedding:,}"),
        ("matmul parameters", f"{matmul_parameters(config):,}"),
        ("layers / d_model / ffn", f"{config.n_layer} / {config.d_model} / {config.ffn_hidden}"),
        ("heads / kv heads", f"{config.n_head} / {config.n_kv_head} (head_dim {config.head_dim})"),
        ("vocab / max_seq_len", f"{config.vocab_size} / {config.max_seq_len}"),
        ("rope theta / norm eps", f"{config.rope_theta:g} / {config.norm_eps:g}"),
        ("embeddings", "tied" if config.tie_embeddings else "untied"),
        (f"FLOPs/token, forward (seq {seq_len})", f"{train_flops / 3:,.0f}"),
        (f"FLOPs/token, training (seq {seq_len})", f"{train_flops:,}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from llamalite.data.prepare import prepare

    prepare(load_config(args.config, args.overrides))


def cmd_train(args: argparse.Namespace) -> None:
    from llamalite.train.trainer import Trainer

    result = Trainer(load_config(args.config, args.overrides)).fit()
    stopped = f"; stopped by {result.stopped_by}, run the same command to resume" if result.stopped_by else ""
    print(f"run directory: {result.run_dir}  ({result.steps} steps, {result.tokens:,} tokens, "
          f"{result.tokens_per_s:,.0f} tokens/s{stopped})")


def cmd_demo(args: argparse.Namespace) -> None:
    from llamalite.demo import run_demo

    run_demo(args.config, args.overrides)


def cmd_export(args: argparse.Namespace) -> None:
    from llamalite.export.hf import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out_dir), dtype=args.dtype, trim_vocab=args.trim_vocab,
                            shard_size=args.shard_size, tokenizer_path=Path(args.tokenizer) if args.tokenizer else None)
    print(f"exported to {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def cmd_import(args: argparse.Namespace) -> None:
    from llamalite.export.hf import import_hf

    out = import_hf(Path(args.hf_dir), Path(args.out_dir))
    has_tokenizer = (out / "tokenizer.json").exists()
    print(f"imported {args.hf_dir} -> checkpoint {out} "
          + ("with its tokenizer.json" if has_tokenizer else "without a tokenizer.json (export will need --tokenizer)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamalite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("model-info", help="parameters and FLOPs per token of a model preset")
    p.add_argument("preset", help="tiny | 124m | dmas-1.7b")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for attention FLOPs (default: the preset's)")
    p.set_defaults(func=cmd_model_info)

    overrides_help = "dotted overrides such as train.max_steps=100"
    p = sub.add_parser("prepare", help="raw text -> tokenizer -> token shards + manifest")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pretrain a model on prepared shards")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="end-to-end demo on the embedded Shakespeare corpus (CPU, minutes)")
    p.add_argument("--config", default=None, help="demo config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="checkpoint -> transformers LlamaForCausalLM folder (weights, config, tokenizer)")
    p.add_argument("checkpoint", help="checkpoint directory (runs/<name>/checkpoints/step_XXXXXXX) or run directory (its newest)")
    p.add_argument("out_dir", help="folder to write; AutoModelForCausalLM.from_pretrained loads it")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype (default: fp32)")
    p.add_argument("--trim-vocab", action="store_true", help="cut the padded embedding/lm_head rows to the tokenizer's size")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors file before sharding (default: 5GB)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to ship (default: the run's, <data.out_dir>/tokenizer.json)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="transformers Llama folder (config.json + safetensors) -> checkpoint directory")
    p.add_argument("hf_dir", help="local folder, e.g. a download of HuggingFaceTB/SmolLM-135M")
    p.add_argument("out_dir", help="checkpoint directory to write")
    p.set_defaults(func=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llamalite.data import DataError
    from llamalite.train.checkpoint import CheckpointError
    from llamalite.train.trainer import TrainError

    try:
        args.func(args)
    except (ConfigError, DataError, TrainError, CheckpointError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("LLAMALITE_DEBUG"):
            raise
        print(f"llamalite: error: {exc}  (set LLAMALITE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llamalite: interrupted", file=sys.stderr)
        return 130
    return 0
