"""torch.compile applied to a model: per repeated block by default, whole model as an option.

Per-block compile (torchtitan's `apply_compile`) compiles each block of the model's repeated
block stack (`transformer.h` in fasttrain's GPT and HF GPT-2, `model.layers` in HF Llama)
in place with `block.compile(...)`. Identical blocks share one compiled graph, so compile
time does not grow with depth, and each block's backward stays a separate autograd node, so
gradient all-reduce hooks still fire block by block and DDP keeps its overlap (a whole-model
compile runs backward as one node: every hook fires at its end). Embeddings, the final norm
and the loss stay eager. Compiling in place keeps `state_dict()` keys unchanged (no
`_orig_mod.` prefix), so checkpoints load with or without compile.

What keeps a compiled run from recompiling (see docs/compile.md):
- static shapes: fixed-length windows and `drop_last=True` (or padding to a fixed length);
  `dynamic=False` makes a changed shape a visible recompile instead of a silent switch to
  dynamic-shape kernels;
- the learning rate and other per-step Python scalars stay outside compiled code (the
  optimizer step is not compiled here) or live in tensors;
- `CompileMonitor` (fasttrain.compile.monitor) counts recompiles and names the failed
  guard of any recompile after warm-up.

The compile cache: Inductor's FX-graph cache and AOTAutograd cache are on by default and
keyed by the graph, so a second run with the same model skips code generation. fasttrain
points them at a persistent per-user directory instead of /tmp (`default_cache_dir()`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fasttrain.compile.monitor import CompileMonitor

__all__ = [
    "COMPILE_MODES",
    "CompileConfig",
    "CompileMonitor",
    "SequenceLengthWatcher",
    "allow_dynamic_lengths",
    "apply_compile",
    "compile_from_args",
    "compiled_module_names",
    "configure_compile_cache",
    "default_cache_dir",
    "find_repeated_blocks",
]

logger = logging.getLogger("fasttrain.compile.apply")

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileConfig:
    """How `apply_compile` compiles a model (validated on construction)."""

    mode: str | None = None
    per_block: bool = True
    fullgraph: bool = False
    dynamic: bool | None = False
    backend: str | Callable = "inductor"
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self):
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compile mode={self.mode!r} is not one of {COMPILE_MODES}")
        for name in ("per_block", "fullgraph"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.dynamic not in (True, False, None):
            raise ValueError(
                f"dynamic={self.dynamic!r}: use False (static shapes, recommended for training), "
                "True (dynamic-shape kernels) or None (torch decides after a shape change)"
            )
        if not (isinstance(self.backend, str) or callable(self.backend)):
            raise TypeError(f"backend must be a name such as 'inductor' or a callable, "
                            f"got {self.backend!r}")

    def torch_compile_kwargs(self) -> dict:
        return {"mode": self.mode, "fullgraph": self.fullgraph, "dynamic": self.dynamic,
                "backend": self.backend}


def default_cache_dir() -> Path:
    """`$FASTTRAIN_CACHE_DIR/inductor`, else `$XDG_CACHE_HOME/fasttrain/inductor`, else
    `~/.cache/fasttrain/inductor`."""
    if os.environ.get("FASTTRAIN_CACHE_DIR"):
        return Path(os.environ["FASTTRAIN_CACHE_DIR"]).expanduser() / "inductor"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fasttrain" / "inductor"


def configure_compile_cache(cache_dir: str | os.PathLike | None = None) -> str:
    """Point Inductor's on-disk caches at `cache_dir` and return the directory in use.

    `cache_dir=None` keeps a `TORCHINDUCTOR_CACHE_DIR` the user (or an earlier compile in this
    process) already set, else uses `default_cache_dir()`. Call before the first compile of
    the process: Inductor fixes its directory when it first compiles. The FX-graph and
    AOTAutograd caches are switched on unless the user turned them off through their
    environment variables (TORCHINDUCTOR_FX_GRAPH_CACHE, TORCHINDUCTOR_AUTOGRAD_CACHE).
    """
    if cache_dir is None and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    else:
        path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path.absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the compile cache directory {path}: {err}; pass a "
                      "writable cache_dir or set FASTTRAIN_CACHE_DIR") from err
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
        inductor_config.fx_graph_cache = True
    if ("TORCHINDUCTOR_AUTOGRAD_CACHE" not in os.environ
            and hasattr(functorch_config, "enable_autograd_cache")):
        functorch_config.enable_autograd_cache = True
    return str(path)


def find_repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the outermost `nn.ModuleList`s holding two or more blocks of one class.

    `transformer.h` for fasttrain's GPT and HF GPT-2, `model.layers` for HF Llama; both stacks
    of an encoder-decoder. Lists inside an already found block (heads, experts) are skipped.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in found):
            continue
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        classes = {type(block) for block in module}
        has_params = all(any(True for _ in block.parameters()) for block in module)
        if len(classes) == 1 and has_params:
            found.append(name)
    return found


def compiled_module_names(model: nn.Module) -> list[str]:
    """Names of the submodules compiled in place (`""` is the model itself)."""
    return [name for name, module in model.named_modules()
            if getattr(module, "_compiled_call_impl", None) is not None]


def apply_compile(
    model: nn.Module,
    mode: str | None = None,
    per_block: bool = True,
    fullgraph: bool = False,
    dynamic: bool | None = False,
    *,
    backend: str | Callable = "inductor",
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Compile `model` in place with torch.compile and return it.

    per_block=True compiles every block of each repeated block stack (`find_repeated_blocks`)
    and leaves the rest eager; a model without repeated blocks is compiled whole (logged).
    per_block=False compiles the whole model. `mode`, `fullgraph`, `dynamic` and `backend`
    go to torch.compile; `cache_dir` to `configure_compile_cache`. Apply before wrapping the
    model in DDP. Compilation itself happens lazily, at the first call.
    """
    config = CompileConfig(mode=mode, per_block=per_block, fullgraph=fullgraph,
                           dynamic=dynamic, backend=backend, cache_dir=cache_dir)
    _check_not_compiled(model)
    cache = configure_compile_cache(config.cache_dir)
    kwargs = config.torch_compile_kwargs()
    model._fasttrain_compile_kwargs = dict(kwargs)  # allow_dynamic_lengths recompiles with these
    stacks = find_repeated_blocks(model) if config.per_block else []
    if not stacks:
        if config.per_block:
            logger.info("no repeated blocks (nn.ModuleList of one block class) in %s: "
                        "compiling the whole model", type(model).__name__)
        model.compile(**kwargs)
        logger.info("torch.compile: whole model, mode=%s, cache %s", mode, cache)
        return model
    _warn_if_hf_kv_cache(model)
    n_blocks = 0
    for name in stacks:
        for block in model.get_submodule(name):
            block.compile(**kwargs)
            n_blocks += 1
    _allow_one_entry_per_block(n_blocks)
    logger.info("torch.compile: %d blocks per block in %s, mode=%s, cache %s",
                n_blocks, ", ".join(stacks), mode, cache)
    return model


def allow_dynamic_lengths(model: nn.Module) -> int:
    """Recompile the compiled parts of `model` with `dynamic=None`, so the next new shape
    compiles one dynamic-shape graph that every later length reuses (Dynamo's automatic
    dynamic shapes) instead of one static graph per length, which under per-block compile
    reaches the recompile limit within a dozen padded batches and then runs eager.
    Returns how many modules were recompiled (0 when already dynamic or not compiled)."""
    kwargs = getattr(model, "_fasttrain_compile_kwargs", None)
    if kwargs is None or kwargs.get("dynamic") is not False:
        return 0
    kwargs = dict(kwargs, dynamic=None)
    names = compiled_module_names(model)
    for name in names:
        model.get_submodule(name).compile(**kwargs)
    model._fasttrain_compile_kwargs = kwargs
    return len(names)


class SequenceLengthWatcher:
    """Watches the sequence length (dim 1 of `input_ids`, else of the first 2-D tensor) of
    the batches a compiled model sees; at the first change (a padding collator, ragged
    evaluation batches) it switches the model to dynamic lengths (`allow_dynamic_lengths`).
    Fixed-length training never changes length and keeps its static kernels. Host-side
    shape reads only: no device sync."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.first: int | None = None
        self.switched = False

    def observe(self, batch) -> bool:
        """True when this batch made the switch."""
        if self.switched or not isinstance(batch, dict):
            return False
        ids = batch.get("input_ids")
        if not (isinstance(ids, torch.Tensor) and ids.dim() >= 2):
            ids = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
        if ids is None:
            return False
        length = int(ids.shape[1])
        if self.first is None:
            self.first = length
            return False
        if length == self.first:
            return False
        self.switched = True
        n = allow_dynamic_lengths(self.model)
        if n:
            logger.info("torch_compile: batches of varying length (%d, then %d): %d compiled module(s) "
                        "now take the sequence length as dynamic (one more compile, none per new "
                        "length). For static kernels pad to a fixed length (padding='max_length' or "
                        "pad_to_multiple_of) with dataloader_drop_last=True", self.first, length, n)
        return True


def compile_from_args(model: nn.Module, args) -> CompileMonitor | None:
    """The Trainer's entry point: compile `model` in place as `args` asks.

    Reads `torch_compile`, `torch_compile_mode`, `torch_compile_per_block` and, when the
    arguments have them, `torch_compile_backend` and `torch_compile_cache_dir`. Returns a
    started `CompileMonitor`, or None when `torch_compile` is off. Training only: an HF
    model's KV cache is switched off (`config.use_cache = False`), as HF does for gradient
    checkpointing, because it makes every block compile separately.
    """
    if not getattr(args, "torch_compile", False):
        return None
    if getattr(args, "dataloader_drop_last", True) is False:
        logger.warning("torch_compile with dataloader_drop_last=False: the shorter last batch "
                       "of every epoch recompiles the model; set dataloader_drop_last=True")
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) is True:
        config.use_cache = False
        logger.info("torch_compile: set %s.config.use_cache=False for training",
                    type(model).__name__)
    monitor = CompileMonitor().start()
    apply_compile(model, mode=getattr(args, "torch_compile_mode", None),
                  per_block=getattr(args, "torch_compile_per_block", True),
                  backend=getattr(args, "torch_compile_backend", None) or "inductor",
                  cache_dir=getattr(args, "torch_compile_cache_dir", None))
    return monitor


def _check_not_compiled(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_compile needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or compiled_module_names(model):
        raise ValueError(
            "model is already compiled (torch.compile or Module.compile was applied); pass "
            "the original eager model to apply_compile once"
        )


def _warn_if_hf_kv_cache(model: nn.Module) -> None:
    # HF decoders build a KV cache in training too when config.use_cache is True; each
    # layer's cache update is guarded per layer, so every block compiles on its own.
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) is True:
        logger.warning(
            "%s.config.use_cache=True: in training the KV cache makes every block compile "
            "separately (one recompile per layer, guard on past_key_values.layers[i]); set "
            "model.config.use_cache = False for training", type(model).__name__)


def _allow_one_entry_per_block(n_blocks: int) -> None:
    # Blocks share one code object, so Dynamo's per-code recompile limit (8) is shared by
    # all of them. Blocks that guard on something per-instance compile once each; above the
    # limit the rest would run eager without an error. Raise the limit to cover every block.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < n_blocks + 8:
        setattr(config, name, n_blocks + 8)
