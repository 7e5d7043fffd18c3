"""The `llamalite` command: one subcommand per stage, each a thin call into its module.

Each command imports its module when it runs: `prepare`, `report` and `--help` never load torch (~2 s).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from llamalite.config import DEVICE_PATTERN, MAX_WORKERS, Config, load_config
from llamalite.errors import ConfigError, LlamaliteError
from llamalite.eval.tasks import TASKS
from llamalite.logs import setup_logging
from llamalite.model.presets import count_parameters, get_preset, matmul_parameters, training_flops_per_token
from llamalite.schema import MAX_COUNT, MAX_SEED, Range, between, declared_range, matching, non_negative, positive
from llamalite.text import (
    EXIT_BROKEN_PIPE,
    StandardStreamError,
    report_stream_error,
    restore_standard_streams,
    silence_closed_streams,
    tolerant_standard_streams,
)
from llamalite.tokenizer import Tokenizer

# OpenMP's threads wait at barriers by spinning by default: on a machine shared with other work, 2 threads of a tiny
# model's step ran 1.25x faster with PASSIVE waiting and 1% slower on a quiet machine (benchmarks/train_throughput.py
# --threads). Decoding is the opposite: its steps are many tiny kernels, each waking sleeping threads, and PASSIVE
# made them 1.3-3.7x slower (benchmarks/generate_throughput.py), so generate and chat keep OpenMP's default.
# Read once, when torch loads its OpenMP: commands import torch after main() has set it.
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"
DECODING_COMMANDS = ("generate", "chat")  # their stdout is the text: log lines go to stderr
# A run stopped by SIGTERM/SIGINT after saving a checkpoint: not finished, so not 0 (Slurm would record the job as
# done); EX_TEMPFAIL, "try again", which a batch script turns into `scontrol requeue` (docs/scaling.md).
EXIT_STOPPED = 75


def cmd_model_info(args: argparse.Namespace) -> None:
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


def cmd_plan(args: argparse.Namespace) -> None:
    from llamalite.plan import format_plan, gpu_hardware, plan_run

    config = load_config(args.config, args.overrides)
    hardware = gpu_hardware(args.gpu, args.gpus, args.gpu_memory, args.gpu_flops, args.mfu)
    print(format_plan(plan_run(config, hardware, prepared_vocab_size(config)), args.config))


def prepared_vocab_size(config: Config) -> int | None:
    """The padded size of the prepared data's tokenizer, for a config that leaves model.vocab_size to it."""
    tokenizer_file = Path(config.data.out_dir) / "tokenizer.json"
    if config.model.vocab_size is not None or not tokenizer_file.is_file():
        return None
    tokenizer = Tokenizer.load(tokenizer_file, config.tokenizer.eos_token)
    return tokenizer.padded_vocab_size(config.tokenizer.pad_vocab_multiple)


def cmd_prepare(args: argparse.Namespace) -> None:
    from llamalite.data.prepare import prepare

    prepare(load_config(args.config, args.overrides))


def cmd_train(args: argparse.Namespace) -> int:
    from llamalite.runtime import is_main_process, shutdown_distributed
    from llamalite.train.trainer import Trainer

    try:
        result = Trainer(load_config(args.config, args.overrides)).fit()
        is_main = is_main_process()
    finally:
        shutdown_distributed()  # under torchrun; nothing to do on one process
    if not is_main:  # under torchrun rank 0 alone reports
        return
    stopped = f"; stopped by {result.stopped_by}, run the same command to resume" if result.stopped_by else ""
    print(f"run directory: {result.run_dir}  ({result.steps} steps, {result.tokens:,} tokens, "
          f"{result.tokens_per_s:,.0f} tokens/s{stopped})")
    return EXIT_STOPPED if result.stopped_by else 0


def cmd_consolidate(args: argparse.Namespace) -> None:
    from llamalite.checkpoint.sharded import consolidate
    from llamalite.train.optim import build_optimizer

    def cpu_optimizer(model, config):
        return build_optimizer(model, config.optim, "cpu")

    out = consolidate(Path(args.checkpoint), Path(args.out_dir), cpu_optimizer, force=args.force)
    print(f"consolidated {args.checkpoint} -> {out} (single-file weights, optimizer and trainer state)")


def cmd_demo(args: argparse.Namespace) -> int:
    from llamalite.demo import run_demo

    stopped_by = run_demo(args.config, args.overrides, args.sft_override, args.alpaca).stopped_by
    return 128 + signal.Signals[stopped_by] if stopped_by else 0


def cmd_export(args: argparse.Namespace) -> None:
    from llamalite.export.hf import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out_dir), dtype=args.dtype, trim_vocab=args.trim_vocab,
                            shard_size=args.shard_size, tokenizer_path=Path(args.tokenizer) if args.tokenizer else None,
                            force=args.force)
    print(f"exported to {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def cmd_import(args: argparse.Namespace) -> None:
    from llamalite.export.hf import import_hf

    out = import_hf(Path(args.hf_dir), Path(args.out_dir), force=args.force)
    has_tokenizer = (out / "tokenizer.json").exists()
    missing = ("without a tokenizer.json: copy the model's tokenizer.json into it before generate, chat or eval "
               "(export takes --tokenizer instead)")
    print(f"imported {args.hf_dir} -> checkpoint {out} " + ("with its tokenizer.json" if has_tokenizer else missing))


def sampling_options(args: argparse.Namespace):
    from llamalite.generate import SamplingOptions

    return SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                           top_k=args.top_k, top_p=args.top_p, stop=tuple(args.stop or ()))


def cmd_eval(args: argparse.Namespace) -> None:
    from llamalite.evaluate import (
        SweepOptions,
        claim_results_json,
        dynamics_table,
        evaluate_checkpoints,
        read_evals_for,
        write_results_json,
    )

    check_eval_arguments(args)
    task_files = dict(_key_value(item, "--task-file") for item in args.task_file)
    options = SweepOptions(tasks=_task_list(args.tasks), limit=args.limit, all_checkpoints=args.all_checkpoints,
                           val_loss=not args.no_val_loss, batch_size=args.batch_size, data_dir=args.data_dir,
                           task_files=task_files, device=args.device, dtype=args.dtype,
                           skip_too_long=args.skip_too_long)
    if args.output_json:
        claim_results_json(Path(args.output_json), Path(args.target))  # refused before hours of evaluation
    records = evaluate_checkpoints(Path(args.target), options)
    table_records = read_evals_for(Path(args.target), options, records)
    print(dynamics_table(table_records, width=shutil.get_terminal_size().columns))
    if args.output_json:
        step = write_results_json(Path(args.output_json), Path(args.target), options, table_records)
        print(f"wrote step {step}'s results in lm-evaluation-harness's layout to {args.output_json}")


def check_eval_arguments(args: argparse.Namespace) -> None:
    if args.val_only and args.tasks:
        raise ConfigError("--val-only and --tasks exclude each other: pass one")
    if not args.val_only and not args.tasks:
        raise ConfigError("llamalite eval needs --tasks NAMES|all (benchmarks), or --val-only (validation loss alone)")
    if args.val_only and (args.no_val_loss or args.output_json):
        raise ConfigError("--val-only computes only the validation loss: drop --no-val-loss and --output-json")


def _task_list(text: str) -> list[str]:
    return list(TASKS) if text == "all" else [name for name in text.split(",") if name.strip()] if text else []


def _key_value(item: str, flag: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"{flag} {item!r} must look like TASK=PATH, e.g. piqa=data/piqa_validation.jsonl")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def load_for_decoding(args: argparse.Namespace):
    """The checkpoint of `generate`/`chat`, its weights in --dtype."""
    import torch

    from llamalite.checkpoint.inference import load_for_inference

    loaded = load_for_inference(Path(args.checkpoint))
    if args.dtype == "bf16":
        loaded.model.to(torch.bfloat16)
    return loaded


def cmd_generate(args: argparse.Namespace) -> None:
    from llamalite.chat import run_generate

    set_threads(args.threads)
    options = sampling_options(args)  # checked before the checkpoint is loaded
    options.validate()
    run_generate(load_for_decoding(args), args.prompt, options, seed=args.seed, stream=not args.no_stream,
                 compile=args.compile)


def cmd_chat(args: argparse.Namespace) -> None:
    from llamalite.chat import run_chat

    set_threads(args.threads)
    options = sampling_options(args)
    options.validate()
    run_chat(load_for_decoding(args), args.template, options, seed=args.seed, system=args.system, jsonl=args.jsonl,
             compile=args.compile)


def cmd_report(args: argparse.Namespace) -> None:
    from llamalite.report import build_report

    print(f"report: {build_report([Path(p) for p in args.run_dirs], Path(args.out) if args.out else None)}")


def cmd_sft(args: argparse.Namespace) -> int:
    from llamalite.sft import run_sft

    result = run_sft(load_config(args.config, args.overrides))
    stopped = f"; stopped by {result.stopped_by}, run the same command to resume" if result.stopped_by else ""
    print(f"run directory: {result.run_dir}  ({result.steps} steps{stopped}); "
          f"`llamalite merge {result.run_dir} OUT_DIR` writes a plain checkpoint")
    return EXIT_STOPPED if result.stopped_by else 0


def cmd_merge(args: argparse.Namespace) -> None:
    from llamalite.sft import merge

    out = merge(Path(args.checkpoint), Path(args.out_dir), Path(args.adapter_out) if args.adapter_out else None,
                force=args.force, adapter_base=args.adapter_base)
    adapter = f"; adapter in PEFT format in {args.adapter_out}" if args.adapter_out else ""
    print(f"merged checkpoint: {out}{adapter}")


# -- option types: each numeric option declares its range beside it, as config keys do (llamalite/schema.py); a
# value outside it (zero, negative, NaN, inf, huge) is argparse's usage error (exit 2), before anything runs
def option_type(kind: type, metadata: dict[str, Range]):
    """An argparse type reading `kind` (int or float) within the declared range of `metadata`."""
    declared = declared_range(metadata)
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}: it takes {declared.describe()}") from None
        problem = declared.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text!r} {problem}")
        return value

    parse.__name__ = what  # argparse names the type by it in its own messages
    return parse


def positive_int(high: int = MAX_COUNT):
    return option_type(int, positive(high=high))


def non_negative_int(high: int = MAX_COUNT):
    return option_type(int, non_negative(high=high))


def positive_float():
    return option_type(float, positive(integer=False))


def non_negative_float():
    return option_type(float, non_negative(integer=False))


def fraction():
    """In (0, 1]: a probability mass or a utilisation."""
    return option_type(float, between(0, 1, low_open=True))


def device_name(text: str) -> str:
    problem = declared_range(matching(DEVICE_PATTERN, "auto, cpu, cuda or cuda:N")).problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return text


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=non_negative_int(), default=max_new_tokens,
                   help=f"default: {max_new_tokens}")
    p.add_argument("--temperature", type=non_negative_float(), default=0.8, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=non_negative_int(), default=50,
                   help="sample from the k most likely tokens; 0: all (default: 50)")
    p.add_argument("--top-p", type=fraction(), default=None,
                   help="nucleus sampling: the smallest set with this probability, in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="always the most likely token (same as --temperature 0)")
    p.add_argument("--stop", action="extend", nargs="+", default=None, metavar="STR",
                   help="stop at this text, which is left out of the output (several allowed)")
    p.add_argument("--seed", type=non_negative_int(MAX_SEED), default=None,
                   help="seed of the sampling generator (default: random)")
    p.add_argument("--threads", type=positive_int(MAX_WORKERS), default=None,
                   help="torch intra-op threads (default: torch's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype (default: fp32)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a compiled step of fixed shapes: 1.9-3x the eager tokens/s on a CPU after a "
                   "first compile of 10-50 s per batch size and cache length, so it pays off from a few thousand "
                   "tokens per process; the same tokens in fp32 (default: off; see docs/generation.md)")


def add_force_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty: files of the same "
                   "names are replaced, nothing else is deleted (default: refuse)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamalite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("model-info", help="parameters and FLOPs per token of a model preset")
    p.add_argument("preset", help="tiny | 30m | 124m | 350m | dmas-1.7b")
    p.add_argument("--seq-len", type=positive_int(), default=None,
                   help="sequence length for attention FLOPs (default: the preset's)")
    p.set_defaults(func=cmd_model_info)

    overrides_help = "dotted overrides such as train.max_steps=100"
    p = sub.add_parser("plan", help="memory per GPU, time and disk of a training run, before spending GPU time")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--gpus", type=positive_int(1 << 20), default=1, help="GPUs (ranks) the run will use (default: 1)")
    p.add_argument("--gpu", default="h100", help="GPU model, e.g. h100 (the default: 80 GB SXM), h200, a100-80gb, "
                   "a100-40gb, a6000, l40s, 4090 (an unknown name lists them all)")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GB (GB as GPU makers use it: 2^30 "
                   "bytes); default: the --gpu's")
    p.add_argument("--gpu-flops", type=positive_float(), default=None, help="dense bf16 peak FLOP/s per GPU, e.g. "
                   "989e12; default: the --gpu's")
    p.add_argument("--mfu", type=fraction(), default=0.45,
                   help="model-FLOPs utilisation the run reaches, in (0, 1] (default: 0.45)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("prepare", help="raw text -> tokenizer -> token shards + manifest")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pretrain a model on prepared shards")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("consolidate", help="sharded (FSDP) checkpoint -> single-file checkpoint directory")
    p.add_argument("checkpoint", help="checkpoint directory written with train.parallel=fsdp "
                   "(runs/<name>/checkpoints/step_XXXXXXX)")
    p.add_argument("out_dir",
                   help="checkpoint directory to write (eval, export and a resume at any world size read it)")
    add_force_argument(p)
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("demo", help="end-to-end demo on the embedded Shakespeare corpus (CPU, minutes)")
    p.add_argument("--config", default=None, help="demo config (default: the packaged llamalite/configs/demo.yaml)")
    p.add_argument("--alpaca", default=None, metavar="FILE", help="Alpaca-format JSON for the fine-tuning stage "
                   "(e.g. alpaca_5000.json; default: instruction pairs made from the plays)")
    p.add_argument("--sft-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the fine-tuning stage's config (llamalite/configs/sft-demo.yaml), "
                   "e.g. train.max_steps=10")
    p.add_argument("overrides", nargs="*", help=overrides_help + " (of the pretraining stage)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="checkpoint -> transformers LlamaForCausalLM folder (weights, config, tokenizer)")
    p.add_argument("checkpoint", help="checkpoint directory (runs/<name>/checkpoints/step_XXXXXXX) "
                   "or run directory (its newest)")
    p.add_argument("out_dir", help="folder to write; AutoModelForCausalLM.from_pretrained loads it")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype (default: fp32)")
    p.add_argument("--trim-vocab", action="store_true",
                   help="cut the padded embedding/lm_head rows to the tokenizer's size")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors file before sharding (default: 5GB)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json to ship (default: the run's, <data.out_dir>/tokenizer.json)")
    add_force_argument(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="transformers Llama folder (config.json + safetensors) -> checkpoint directory")
    p.add_argument("hf_dir", help="local folder, e.g. a download of HuggingFaceTB/SmolLM-135M")
    p.add_argument("out_dir", help="checkpoint directory to write")
    add_force_argument(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("eval", help="validation loss and zero-shot benchmarks of a checkpoint, "
                       "or of every checkpoint of a run")
    p.add_argument("target", help="run directory (its newest checkpoint, or all with --all-checkpoints) "
                   "or checkpoint directory")
    p.add_argument("--tasks", default="",
                   help="comma-separated: hellaswag,arc_easy,arc_challenge,piqa,winogrande,boolq,"
                   "openbookqa,lambada_openai, or all (required unless --val-only)")
    p.add_argument("--val-only", action="store_true",
                   help="only the validation loss on the run's held-out split (no benchmarks)")
    p.add_argument("--output-json", default=None, metavar="PATH",
                   help="also write the newest checkpoint's results in lm-evaluation-harness's results layout")
    p.add_argument("--limit", type=positive_int(), default=None,
                   help="score the first N examples of each task (a fixed subset)")
    p.add_argument("--all-checkpoints", action="store_true",
                   help="every checkpoint of the run, skipping ones already in evals.jsonl")
    p.add_argument("--data-dir", default=None, help="folder of local task files named as their HF split (e.g. "
                   "hellaswag_val.jsonl, piqa_validation.jsonl); default: download through `datasets`")
    p.add_argument("--task-file", action="append", default=[], metavar="TASK=PATH",
                   help="a task's local file (repeatable)")
    p.add_argument("--batch-size", type=positive_int(), default=32, help="sequences per forward pass (default: 32)")
    p.add_argument("--skip-too-long", action="store_true",
                   help="leave out documents whose continuation is longer than the model's context (counted per "
                   "task in evals.jsonl) instead of stopping before any scoring; long contexts are left-truncated "
                   "either way, as lm-evaluation-harness does")
    p.add_argument("--no-val-loss", action="store_true", help="skip the validation loss on the run's held-out split")
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 (as lm-evaluation-harness) or bf16 autocast")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue prompts with a checkpoint (KV cache; streams one prompt)")
    p.add_argument("checkpoint", help="checkpoint directory or run directory (its newest)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    add_sampling_arguments(p, max_new_tokens=128)
    p.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a checkpoint in its chat template (stdin lines when not a terminal)")
    p.add_argument("checkpoint", help="checkpoint directory or run directory (its newest)")
    p.add_argument("--template", default=None, help="plain | vicuna_v1.1 | chatml (default: the checkpoint's sft "
                   "template, else plain)")
    p.add_argument("--system", default=None, help="system message opening the conversation")
    p.add_argument("--jsonl", action="store_true", help="non-interactive: one JSON object per answer "
                   "({user, assistant, finish_reason}) instead of the answer text")
    add_sampling_arguments(p, max_new_tokens=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("report", help="training-dynamics report of runs: HTML page, PNG figures, CSV exports")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories; several are overlaid for comparison")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report/ for one run, "
                   "<first RUN_DIR>/report/compare/ for several)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sft", help="fine-tune a checkpoint on instruction data (LoRA or full), resumable")
    p.add_argument("config", help="YAML config with an sft: section (see configs/sft-*.yaml)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("merge", help="fold an SFT run's LoRA adapters into the base: a plain checkpoint directory")
    p.add_argument("checkpoint", help="SFT checkpoint directory or run directory (its newest)")
    p.add_argument("out_dir", help="checkpoint directory to write (with tokenizer.json; export and chat load it)")
    p.add_argument("--adapter-out", default=None, help="also save the adapters in PEFT format (adapter_config.json + "
                   "adapter_model.safetensors, transformers' module names) in this folder")
    p.add_argument("--adapter-base", default=None, help="base_model_name_or_path of the adapter: the folder or Hub "
                   "id of the base's transformers export (default: the run's sft.base checkpoint)")
    add_force_argument(p)
    p.set_defaults(func=cmd_merge)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but `key=value` overrides may also follow the options (`plan CONFIG --gpus 8 train.x=1`)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (LlamaliteError) prints one line and returns 2; a training run stopped by a
    signal returns EXIT_STOPPED; a reader that closed the pipe (`| head`) ends any command quietly with
    EXIT_BROKEN_PIPE, as SIGPIPE would; a standard output or error that cannot be written (a full disk) is one line
    and 2; any other exception is a bug and propagates with its traceback."""
    tolerant_standard_streams()
    try:
        try:
            return run_command(argv)
        finally:
            sys.stdout.flush()  # a closed pipe fails here, inside the handler, not at the interpreter's exit
    except BrokenPipeError:
        silence_closed_streams()
        return EXIT_BROKEN_PIPE
    except StandardStreamError as exc:  # stdout or stderr itself could not be written: one line, as a user error
        report_stream_error(exc)
        return 2
    finally:
        restore_standard_streams()


def run_command(argv: list[str] | None) -> int:
    args = parse_arguments(build_parser(), argv)
    decoding = args.command in DECODING_COMMANDS
    if not decoding:
        os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_OMP_WAIT_POLICY)  # a user's own setting wins
    setup_logging(logging.DEBUG if os.environ.get("LLAMALITE_DEBUG") else logging.INFO, all_to_stderr=decoding)
    try:
        code = args.func(args)
    except LlamaliteError as exc:
        if os.environ.get("LLAMALITE_DEBUG"):
            raise
        print(f"llamalite: error: {exc}  (set LLAMALITE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llamalite: interrupted", file=sys.stderr)
        return 130
    return code or 0
