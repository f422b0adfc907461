"""The `fasttrain` command: train, sample, bench, report.

`fasttrain train` with no arguments trains the built-in GPT on this Python's standard
library sources (byte-level tokens) and prints a summary. Every TrainingArguments field is
a flag (`--learning_rate 1e-3`, `--bf16`/`--no-bf16`) or a key of `--config file.yaml|json`;
flags win over the file, the file over the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import os
import re
import sys
import time
import typing

from fasttrain.training_args import (TrainingArguments, convert_field_value, field_help,
                                     field_types)

# The default job: a few hundred steps, a few minutes on 2 CPU cores.
DEFAULT_JOB = dict(
    max_steps=400, per_device_train_batch_size=16, per_device_eval_batch_size=32,
    learning_rate=2e-3, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=20,
    logging_steps=25, eval_strategy="steps", eval_steps=100, save_strategy="steps",
    save_steps=400, save_total_limit=2, max_grad_norm=1.0, adam_beta2=0.95,
    report_to=["jsonl", "tensorboard"], dataloader_drop_last=True,
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in its help."""


class Parser(argparse.ArgumentParser):
    """argparse with fasttrain's manners: every flag in both spellings (--learning_rate and
    --learning-rate), no prefix guessing, negative numbers as values (--learning_rate -1e-3),
    and "did you mean" for a misspelt flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(_attach_negative_values(args), namespace)

    def error(self, message):
        if "unrecognized arguments" in message:
            known = _option_strings(self)
            hints = []
            for word in message.split(":", 1)[1].split():
                if word.startswith("-"):
                    close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.75)
                    if close:
                        hints.append(f"{word}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _attach_negative_values(argv: list) -> list:
    """`--flag -1e-3` -> `--flag=-1e-3`: argparse takes '-1e-3' for an option otherwise."""
    out = []
    for i, token in enumerate(argv):
        prev = out[-1] if out else ""
        if (_NUMBER.fullmatch(token) and prev.startswith("--") and "=" not in prev and i > 0):
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def _option_strings(parser: argparse.ArgumentParser) -> list:
    found = []
    for action in parser._actions:
        found += [s for s in action.option_strings if s.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _option_strings(sub)
    return sorted(set(found))


def _spellings(name: str) -> list:
    """'--learning_rate' and '--learning-rate' (one spelling when the name has no '_' or '-')."""
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}", f"--{name.replace('-', '_')}"]))


def add_training_argument_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainingArguments field, typed by the field's annotation (the converter
    a config file's values also go through), with its documentation and default as help."""
    group = parser.add_argument_group("TrainingArguments (HF names; --name_with_underscores "
                                      "and --name-with-hyphens both work)")
    defaults = TrainingArguments.__dataclass_fields__
    kinds = field_types()
    for f in dataclasses.fields(TrainingArguments):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = DEFAULT_JOB.get(f.name, default)
        doc = field_help(f.name)
        help_text = f"{doc + ' ' if doc else ''}(default: {shown!r})".replace("%", "%%")
        flags = _spellings(f.name)
        if kinds[f.name] == (bool,):
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar="VALUE",
                               type=functools.partial(_flag_value, f.name), help=help_text)
    del defaults


def _flag_value(name: str, text: str):
    try:
        return convert_field_value(name, text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"--config {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml
        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path!r} must hold a mapping of TrainingArguments fields")
    known = field_types()
    try:  # YAML reads 1e-3 and 1e2 as strings: the converters the flags use apply here too
        return {k: convert_field_value(k, v) if k in known else v for k, v in values.items()}
    except ValueError as e:
        raise ValueError(f"--config {path!r}: {e}") from None


# ---------------------------------------------------------------- train
def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train the built-in GPT (default: on the Python stdlib sources)",
                       description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--config", help="YAML or JSON file of TrainingArguments fields")
    p.add_argument("--name", help="run name; output goes to runs/<name>/ (default: a timestamp)")
    p.add_argument("--data", help="a folder of text files or a .bin token file (default: stdlib sources)")
    p.add_argument("--val-data", "--val_data", help="validation .bin token file (default: a held-out split)")
    p.add_argument("--model-size", "--model_size", default="tiny", help="built-in GPT size: tiny, small, gpt2")
    p.add_argument("--seq-len", "--seq_len", type=int, default=128, help="tokens per training window")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1,
                   help="processes per node; >1 relaunches this command under torchrun")
    p.add_argument("--nnodes", default="1", help="torchrun --nnodes (with --rdzv-endpoint for several)")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=None, help="host:port of the c10d rendezvous")
    add_training_argument_flags(p)
    p.set_defaults(func=cmd_train)


def build_training_args(ns: argparse.Namespace, output_dir: str) -> TrainingArguments:
    values = dict(DEFAULT_JOB, output_dir=output_dir)
    if ns.config:
        values.update(load_config_file(ns.config))
    field_names = {f.name for f in dataclasses.fields(TrainingArguments)}
    values.update({k: v for k, v in vars(ns).items() if k in field_names})
    return TrainingArguments.from_dict(values)


def _check_paths(ns, args) -> None:
    """A missing input is one line, before any work (no traceback from deep inside)."""
    for flag, path in (("--data", ns.data), ("--val-data", ns.val_data), ("--config", ns.config)):
        if path is not None and not os.path.exists(path):
            raise SystemExit(f"fasttrain train: error: {flag} {path!r}: no such file or directory")
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume not in ("latest", "True", "true") and not os.path.isdir(resume):
        raise SystemExit(f"fasttrain train: error: --resume_from_checkpoint {resume!r}: no such "
                         "checkpoint directory; pass a checkpoint-<step> folder, or 'latest' for "
                         "the newest one in output_dir")


def _datasets(ns, seq_len: int):
    from fasttrain.data import datasets as data
    if ns.data is None:
        train_path, val_path = data.default_corpus()
    elif os.path.isdir(ns.data):
        train_path = os.path.join(data.cache_dir(), f"{os.path.basename(os.path.abspath(ns.data))}.bin")
        data.build_token_file(data.text_files_in(ns.data), train_path)
        val_path = None
    else:
        train_path, val_path = ns.data, None
    val_path = ns.val_data or val_path
    train = data.TokenDataset(train_path, seq_len)
    val = data.TokenDataset(val_path, seq_len, max_windows=64) if val_path else None
    return train, val


def cmd_train(ns: argparse.Namespace) -> int:
    if ns.nproc_per_node * int(str(ns.nnodes).split(":")[-1]) > 1 and "LOCAL_RANK" not in os.environ:
        from fasttrain.distributed.launch import relaunch_with_torchrun
        argv = list(sys.argv[1:])
        if ns.name is None:  # every rank must write to the same run directory
            argv += ["--name", time.strftime("gpt-%Y%m%d-%H%M%S")]
        return relaunch_with_torchrun(ns.nproc_per_node, ns.nnodes, ns.rdzv_endpoint, argv)
    import torch
    from fasttrain import Trainer
    from fasttrain.models import GPT, GPTConfig, MODEL_SIZES
    if ns.model_size not in MODEL_SIZES:
        raise SystemExit(f"--model-size {ns.model_size!r} is unknown; choose one of {sorted(MODEL_SIZES)}")
    name = ns.name or time.strftime("gpt-%Y%m%d-%H%M%S")
    args = build_training_args(ns, os.path.join("runs", name))
    _check_paths(ns, args)
    if args.resume_from_checkpoint in ("latest", "True", "true"):
        args.resume_from_checkpoint = "latest"
    train_ds, eval_ds = _datasets(ns, ns.seq_len)
    if eval_ds is None:
        args.eval_strategy = "no"
    torch.manual_seed(args.seed)
    cfg = GPTConfig(**{**MODEL_SIZES[ns.model_size], "block_size": ns.seq_len})
    model = GPT(cfg)
    trainer = Trainer(model, args, train_dataset=train_ds, eval_dataset=eval_ds)
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    last_eval = next((r for r in reversed(trainer.state.log_history) if "eval_loss" in r), None)
    if eval_ds is not None and (last_eval is None or last_eval["step"] != out.global_step):
        last_eval = trainer.evaluate()
    eval_loss = last_eval["eval_loss"] if last_eval is not None else None
    trainer.save_model(args.output_dir)
    wall = time.perf_counter() - start
    if trainer.dist.is_main:
        _print_summary(trainer, out, eval_loss, wall, cfg, model)
    return 0


def _print_summary(trainer, out, eval_loss, wall, cfg, model) -> None:
    history = [r for r in trainer.state.log_history if "loss" in r]
    # the last logged window's loss; a run shorter than logging_steps logged none: its mean
    final = (f"{history[-1]['loss']:.4f}" if history else
             f"{out.training_loss:.4f} (the run's mean: no logging step was reached)")
    rows = [
        ("model", f"GPT {cfg.n_layer}L {cfg.n_embd}d, {model.num_parameters() / 1e6:.2f}M params"),
        ("steps", str(out.global_step)),
        ("final train loss", f"{final} (byte-entropy start is about 5.5)"),
        ("final eval loss", f"{eval_loss:.4f}" if eval_loss is not None else "n/a"),
        ("tokens/s", _throughput(trainer, out)),
        ("wall time", f"{wall:.1f} s"),
        ("saved to", trainer.args.output_dir),
        ("try", f"fasttrain sample --checkpoint {trainer.args.output_dir} --prompt 'def '"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n== fasttrain train: summary ==")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


def _throughput(trainer, out) -> str:
    """The run's one throughput figure and its definition (the profile's, when profiling)."""
    summary = getattr(trainer, "profile_summary", None) or {}
    tps = summary.get("throughput", {}).get("tokens_per_second")
    if tps is not None:
        steps = summary["steps"]
        return (f"{tps:.4g} (input tokens of all ranks / time in training steps; "
                f"{steps['measured']} steps measured after {steps['warmup']} warm-up, "
                "evaluation, saves and set-up excluded)")
    metrics = out.metrics
    return (f"{metrics['train_tokens'] / max(metrics['train_runtime'], 1e-9):.4g} "
            "(input tokens of all ranks / train() wall time, evaluation and saves included)")


# ---------------------------------------------------------------- sample
def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained built-in GPT",
                       formatter_class=_HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run dir or checkpoint-<step> dir")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=200,
                   help="tokens to generate after the prompt")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; lower is more predictable")
    p.add_argument("--top-k", "--top_k", type=int, default=40,
                   help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.set_defaults(func=cmd_sample)


def cmd_sample(ns: argparse.Namespace) -> int:
    import torch
    from fasttrain.checkpoint import storage as ckpt
    from fasttrain.models import GPT, GPTConfig
    config_path = os.path.join(ns.checkpoint, "config.json")
    if not os.path.isfile(config_path):
        raise SystemExit(f"{ns.checkpoint!r} has no config.json: pass a run directory or a "
                         "checkpoint-<step> directory written by `fasttrain train`")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.pop("model_type", None) != "fasttrain-gpt":
        raise SystemExit(f"{config_path!r} does not describe a fasttrain built-in GPT")
    model = GPT(GPTConfig(**config))
    ckpt.load_model_weights(model, ns.checkpoint)
    model.eval()
    ids = torch.tensor([list(ns.prompt.encode("utf-8"))], dtype=torch.long)
    if ids.numel() == 0:
        raise SystemExit("--prompt must not be empty")
    g = torch.Generator().manual_seed(ns.seed)
    out = model.generate(ids, ns.max_new_tokens, temperature=ns.temperature, top_k=ns.top_k, generator=g)
    print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
    return 0


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fasttrain", description="A performance-first PyTorch trainer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _sample_parser(sub)
    for module in ("fasttrain.cli.bench", "fasttrain.cli.report"):
        try:
            __import__(module, fromlist=["register"]).register(sub)
        except ImportError:
            pass
    return parser


def main(argv: typing.Optional[list] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from fasttrain.checkpoint.storage import CheckpointError
    try:
        return ns.func(ns) or 0
    except (ValueError, CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"fasttrain {ns.command}: error: {e}", file=sys.stderr)  # the user's input: one line
        return 2


if __name__ == "__main__":
    sys.exit(main())
