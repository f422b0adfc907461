"""Sharded model + optimizer state through torch.distributed.checkpoint (DCP).

Under FSDP every rank writes its own shards in parallel (`shards/__<rank>_0.distcp`; rank 0
also DCP's `shards/.metadata`), nothing is gathered to one rank. DCP's planner records
which slice of each tensor every file holds, so loading on another world size (4 ranks to
2, 1 to 4, FSDP to plain data parallelism) reads the slices each rank now needs: the
resharding is DCP's, none is written here. The other direction, a DDP or single-process
checkpoint (`model.safetensors` + `optimizer.pt`) resumed under FSDP, hands the full state
read on rank 0 to `set_model_state_dict`/`set_optimizer_state_dict(full_state_dict=True,
broadcast_from_rank0=True)` (`load_full_checkpoint`), which keep each rank's slice. Model
and optimizer state go through `get/set_model_state_dict` and `get/set_optimizer_state_dict`,
which key the optimizer state by parameter name, so it survives any re-wrapping.

fasttrain's checkpoint guarantees, kept:
- atomic: every rank writes into the checkpoint's temporary directory; rank 0 commits the
  directory (manifest last, rename) only once every rank's files are durable (DCP fsyncs
  each file, and its metadata is written only after every rank reported its writes), so a
  crash mid-save leaves the previous checkpoint the newest valid one;
- checksummed: each rank CRC-32s its own files; the sums go into the one manifest, and
  `storage.verify` names a corrupted or missing shard;
- nothing unpickled on load: DCP stores its metadata with pickle; `SafeFileSystemReader`
  reads it with an unpickler that only admits DCP's own metadata classes, torch.Size and
  dtypes; the shard payloads are raw tensor bytes (non-tensor values go through
  `torch.load(weights_only=True)` inside DCP);
- in the background: `save_async` stages the state into host memory (the only stall) and
  writes on DCP's thread, over a process group of its own so its collectives never
  interleave with the training step's.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
import zlib
from concurrent.futures import Future
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from fasttrain.checkpoint import hf_layout as hf
from fasttrain.checkpoint.storage import CheckpointError, check_shapes, read_model_state, read_torch

logger = logging.getLogger("fasttrain")

SHARDS_DIR = "shards"
STAGING_PREFIX = ".tmp-shards-"

_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "Path"),
     ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with its pickled metadata read by an allow-list unpickler."""

    def read_metadata(self, *args, **kwargs):
        path = os.path.join(str(self.path), ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"sharded checkpoint {str(self.path)!r} has no .metadata") from None
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"refusing to load {path!r}: {e}; fasttrain never writes such "
                                  "metadata, do not trust this checkpoint") from None
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def has_shards(path: str) -> bool:
    return os.path.isdir(os.path.join(path, SHARDS_DIR))


def _state(model, optimizer) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


_checkpoint_group = None


def checkpoint_process_group():
    """A gloo group of every rank, for the background save's collectives (created once, on
    every rank at the same point)."""
    global _checkpoint_group
    if _checkpoint_group is None and dist.is_initialized():
        _checkpoint_group = dist.new_group(backend="gloo")
    return _checkpoint_group


def save(directory: str, model, optimizer) -> dict:
    """Write this rank's shards into `directory/shards` (blocking; a collective); returns
    this rank's {relative path: {size, crc32}}."""
    dcp.save(_state(model, optimizer), storage_writer=FileSystemWriter(_shards(directory)),
             process_group=checkpoint_process_group())
    return own_files(directory)


def save_async(directory: str, model, optimizer) -> Future:
    """Stage the state into host memory now and write it on DCP's thread. When this rank's
    files are durable, their checksums go to `directory/shards/__<rank>.crc.json` (the
    sign for the committing rank that this rank is done) and the Future resolves to them."""
    future = dcp.async_save(_state(model, optimizer), storage_writer=FileSystemWriter(_shards(directory)),
                            process_group=checkpoint_process_group())
    done: Future = Future()
    rank = dist.get_rank() if dist.is_initialized() else 0

    def finished(f):
        try:
            f.result()
            files = own_files(directory)
            _write_durable(os.path.join(_shards(directory), f"__{rank}.crc.json"), json.dumps(files).encode())
            done.set_result(files)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits
            done.set_exception(e)

    future.add_done_callback(finished)
    return done


def _write_durable(path: str, data: bytes) -> None:
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardedStateIO:
    """The Checkpointer's model/optimizer seam for sharded (FSDP) runs, through DCP.

    `snapshot` (every rank, training thread): stage the shards into host memory and start
    writing them into a staging directory beside the checkpoints; `write` (rank 0's saver
    thread): wait until every rank's shards are durable, move them into the checkpoint's
    temporary directory and list them (with their checksums) in its manifest, which the
    Checkpointer then commits; `load` (every rank): DCP reads the slices this run's
    sharding needs, whatever world size wrote them."""

    def __init__(self, output_dir: str, world_size: int, timeout_s: float = 1800.0):
        self.output_dir, self.world_size, self.timeout_s = output_dir, world_size, timeout_s
        token = [f"{os.getpid()}-{time.time_ns()}"]
        if dist.is_initialized():
            dist.broadcast_object_list(token, src=0)  # one staging name on every rank
        self.token, self.saves = token[0], 0

    def snapshot(self, model, optimizer, is_main: bool):
        self.saves += 1
        staging = os.path.join(self.output_dir, f"{STAGING_PREFIX}{self.token}-{self.saves}")
        return staging, save_async(staging, model, optimizer)

    def write(self, writer, snap) -> None:
        staging, future = snap
        future.result()  # rank 0's own shards and DCP's .metadata (written after every rank reported)
        files = {}
        deadline = time.monotonic() + self.timeout_s
        for rank in range(self.world_size):
            sign = os.path.join(_shards(staging), f"__{rank}.crc.json")
            while not os.path.exists(sign):
                if time.monotonic() > deadline:
                    raise CheckpointError(f"rank {rank} did not finish writing its shards into "
                                          f"{staging!r} within {self.timeout_s:.0f} s")
                time.sleep(0.01)
            with open(sign, encoding="utf-8") as f:
                files.update(json.load(f))
            os.remove(sign)
        os.replace(_shards(staging), _shards(writer.tmp))
        shutil.rmtree(staging, ignore_errors=True)
        writer.files.update(files)

    def load(self, path: str, model, optimizer) -> None:
        if has_shards(path):
            load(path, model, optimizer)
        else:  # written by a DDP or single-process run
            load_full_checkpoint(path, model, optimizer)


def own_files(directory: str) -> dict:
    """CRC-32 and size of the files this rank wrote (its `__<rank>_*.distcp`, and rank 0's
    `.metadata`), keyed by their path relative to the checkpoint directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    shards = _shards(directory)
    mine = [n for n in os.listdir(shards) if n.startswith(f"__{rank}_") and n.endswith(".distcp")]
    if rank == 0:
        mine.append(".metadata")
    out = {}
    for name in sorted(mine):
        crc, size = 0, 0
        with open(os.path.join(shards, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                crc, size = zlib.crc32(block, crc), size + len(block)
        out[f"{SHARDS_DIR}/{name}"] = {"size": size, "crc32": crc}
    return out


def load(path: str, model, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Load model (and optimizer) state from `path/shards` into this run's sharding, or
    into an unsharded model (a DDP or single-process run: DCP then reads every slice); the
    caller verified the manifest first. Tensor-valued learning rates are kept in place (the
    device-side LR schedule holds them)."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        lrs = [g["lr"] for g in optimizer.param_groups]
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(_shards(path)),
                 process_group=checkpoint_process_group())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps per-rank failures
        for failure in getattr(e, "failures", {}).values():  # {rank: (exception, traceback)}
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, CheckpointError):
                raise inner from None
        raise CheckpointError(f"could not load the sharded state of {path!r}: {e}") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
        _keep_tensor_lrs(optimizer, lrs)


def load_full_checkpoint(path: str, model, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """A DDP or single-process checkpoint (`model.safetensors` + `optimizer.pt`) into an
    FSDP model: its full state, keyed by parameter name, goes through
    `set_model_state_dict` / `set_optimizer_state_dict(full_state_dict=True,
    broadcast_from_rank0=True)`, which send one tensor at a time from rank 0 and keep each
    rank's slice (DCP's resharding; none is written here). Rank 0 alone reads the files, so
    host memory holds the optimizer state once per node, not once per rank; whether they
    could be read is agreed first, so a bad file fails on every rank alike instead of
    leaving the others waiting in a collective."""
    lrs = [g["lr"] for g in optimizer.param_groups] if optimizer is not None else []
    # the optimizer's own state dict names its parameters in the order optimizer.pt numbers them
    names = None if optimizer is None else [
        n for g in get_optimizer_state_dict(model, optimizer)["param_groups"] for n in g["params"]]
    main = not dist.is_initialized() or dist.get_rank() == 0
    weights, full, error = {}, {}, None
    if main:
        try:
            weights = _full_weights(path, model)
            full = _named_optimizer_state(path, optimizer, names) if optimizer is not None else {}
        except CheckpointError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(model, weights, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, full, options=options)
        _keep_tensor_lrs(optimizer, lrs)


def _full_weights(path: str, model) -> dict:
    weights = read_model_state(path)
    check_shapes(model, weights, path)
    own = model.state_dict(keep_vars=True)
    for name, tensor in own.items():  # tied weights stored once (HF's files) share the saved one
        if name not in weights:
            twin = next((k for k, t in own.items() if t is tensor and k in weights), None)
            if twin is not None:
                weights[name] = weights[twin]
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r} does not match the model: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    return weights


def _named_optimizer_state(path: str, optimizer, names: list) -> dict:
    saved = hf.fit_optimizer_state(read_torch(path, "optimizer.pt"), optimizer)
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise CheckpointError(f"{path!r}: optimizer.pt holds {len(ids)} parameters, this model trains "
                              f"{len(names)}; resume with the same model and trainable parameters")
    by_id = dict(zip(ids, names))
    return {"state": {by_id[i]: v for i, v in saved["state"].items()},
            "param_groups": [dict(g, params=[by_id[i] for i in g["params"]]) for g in saved["param_groups"]]}


def _keep_tensor_lrs(optimizer, lrs) -> None:
    """Loading replaced each group's LR with the saved float: write it into the device
    tensor the LR schedule updates, and put that tensor back."""
    for group, lr in zip(optimizer.param_groups, lrs):
        if isinstance(lr, torch.Tensor):
            lr.copy_(torch.as_tensor(group["lr"]))
            group["lr"] = lr


def full_model_state(model) -> dict:
    """The whole (unsharded) model state on rank 0's CPU, gathered shard by shard; empty on
    the other ranks. For `save_model`'s single model.safetensors."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _shards(directory: str) -> str:
    return os.path.join(directory, SHARDS_DIR)
