"""Crash-safe checkpoints: atomic directories, a checksummed manifest, safe loading.

Layout of `output_dir/checkpoint-<step>/`:
  model.safetensors      weights (tied/shared tensors stored once, aliases in metadata)
  optimizer.pt           optimizer state_dict      (torch.save; loaded weights_only=True)
  scheduler.pt           LR scheduler state_dict   (idem)
  scaler.pt              loss scaler state_dict, when one is used (idem)
  rng_state_<rank>.pt    python/numpy/torch/cuda RNG states of each rank (idem)
  trainer_state.json     TrainerState (global_step, log_history, best metric, callbacks...)
  data_state.json        data position and the partial logging window
  training_args.json     the TrainingArguments of the run
  manifest.json          written last: size and CRC-32 of every file above
A save writes everything into a hidden temporary directory, fsyncs each file and the
directory, then renames it into place, so a crash leaves the previous set or the new one.
Checksums (CRC-32, for corruption, not for trust: loading is safe by construction) are
computed on the bytes being written, so saving makes no extra pass over the files.

`AsyncSaver` runs the serialisation and the writes on a background thread: the training
step only waits for a snapshot (a copy of the state into host memory).
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import re
import shutil
import threading
import zlib
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

logger = logging.getLogger("fasttrain")

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"  # HF's sharded weights: shard file per tensor


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or could not be written."""


# ---------------------------------------------------------------- writing
class CheckpointWriter:
    """Collects files for one checkpoint and commits them atomically."""

    def __init__(self, output_dir: str, step: int):
        self.output_dir = output_dir
        self.final = os.path.join(output_dir, f"{PREFIX}{step}")
        self.tmp = os.path.join(output_dir, f".tmp-{PREFIX}{step}-{os.getpid()}")
        self.files: dict[str, dict] = {}
        try:
            os.makedirs(output_dir, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            os.makedirs(self.tmp)
        except OSError as e:
            raise _save_error(output_dir, e) from e

    def write_bytes(self, name: str, data: bytes) -> None:
        self._write(name, lambda f: f.write(data))

    def write_torch(self, name: str, obj) -> None:
        self._write(name, lambda f: torch.save(obj, f))  # streamed: no in-memory copy

    def _write(self, name: str, produce) -> None:
        path = os.path.join(self.tmp, name)
        try:
            with open(path, "wb") as raw:
                f = _ChecksummingWriter(raw)
                produce(f)
                raw.flush()
                os.fsync(raw.fileno())
        except Exception as e:  # torch.save turns a failed write into a RuntimeError
            self.abort()
            os_error = _os_error_in(e)
            if os_error is None:
                raise
            raise _save_error(self.output_dir, os_error) from e
        self.files[name] = {"size": f.size, "crc32": f.crc}

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def write_model(self, state_dict: dict, aliases: Optional[dict] = None) -> None:
        self.write_bytes(MODEL_FILE, model_bytes(state_dict, aliases))

    def commit(self, step: int) -> str:
        self.write_json(MANIFEST, {"step": step, "files": self.files, "format": 2})
        try:
            _fsync_dir(self.tmp)
            if os.path.exists(self.final):  # re-saving the same step: swap atomically
                old = self.final + f".old-{os.getpid()}"
                os.replace(self.final, old)
                os.replace(self.tmp, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.final)
            _fsync_dir(self.output_dir)
        except OSError as e:
            self.abort()
            raise _save_error(self.output_dir, e) from e
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _ChecksummingWriter(io.RawIOBase):
    """A write-only file that checksums what passes through to the real file."""

    def __init__(self, raw):
        self.raw, self.crc, self.size = raw, 0, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.crc = zlib.crc32(b, self.crc)
        n = self.raw.write(b)
        self.size += n
        return n

    def flush(self) -> None:
        self.raw.flush()


def _os_error_in(e: BaseException) -> Optional[OSError]:
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_error(output_dir: str, e: OSError) -> CheckpointError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "the disk is full (or over quota/file-size limit)"
        fix = "free space or point output_dir at a larger disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "output_dir is not writable"
        fix = "fix its permissions or choose another output_dir"
    else:
        why, fix = str(e), "check the file system"
    return CheckpointError(f"could not save a checkpoint in {output_dir!r}: {why} ({e}). "
                           f"Previous checkpoints are intact; {fix} and resume.")


def model_bytes(state_dict: dict, aliases: Optional[dict] = None) -> bytes:
    """Weights as safetensors bytes; pass `dedupe_shared`'s output, or a state dict whose
    shared tensors are then found here (they are stored once, aliases in the metadata)."""
    if aliases is None:
        state_dict, aliases = dedupe_shared(state_dict)
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    # "format": "pt" is what transformers checks before it loads a safetensors file
    return st_save(tensors, metadata={"format": "pt", "fasttrain_aliases": json.dumps(aliases)})


def dedupe_shared(state_dict: dict) -> tuple[dict, dict]:
    """Store each storage once (safetensors refuses aliased tensors); returns the tensors
    to save and {alias_name: saved_name}."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.device.type != "meta" and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach()
    return tensors, aliases


# ---------------------------------------------------------------- reading
def list_checkpoints(output_dir: str) -> list[str]:
    """Committed checkpoint directories, oldest first (temporary ones never match)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(rf"{PREFIX}(\d+)", name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def verify(path: str) -> None:
    """Raise CheckpointError naming the problem unless every file matches the manifest."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"Can't find a valid checkpoint at {path!r}: the directory does not "
                              "exist. Pass a checkpoint-N directory of an earlier run, or "
                              "resume_from_checkpoint=True for the newest one in output_dir")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path!r} is incomplete: {MANIFEST} is missing (the save "
                              "was interrupted or the directory was not written by fasttrain)")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path!r} has a corrupt {MANIFEST}: {e}") from None
    for name, meta in files.items():
        file_path = os.path.join(path, name)
        if name == MODEL_FILE and not os.path.isfile(file_path) and _model_shards(path):
            logger.warning("checkpoint %r: the weights were re-sharded after the save (%s); the shards "
                           "are loaded by the index, their bytes are not covered by %s", path, MODEL_INDEX,
                           MANIFEST)
            continue
        if not os.path.isfile(file_path):
            raise CheckpointError(f"checkpoint {path!r} is missing {name}")
        size = os.path.getsize(file_path)
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint {path!r}: {name} is {size} bytes, the manifest "
                                  f"says {meta['size']} (truncated or overwritten)")
        crc = 0
        with open(file_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                crc = zlib.crc32(block, crc)
        if crc != meta.get("crc32"):
            raise CheckpointError(f"checkpoint {path!r}: {name} fails its checksum (corrupt bytes)")


_STALE = re.compile(rf"(\.tmp-{PREFIX}\d+-(\d+)|{PREFIX}\d+\.old-(\d+))")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(output_dir: str) -> list[str]:
    """Delete the half-written `.tmp-checkpoint-<step>-<pid>` (and `checkpoint-<step>.old-<pid>`)
    directories of processes that no longer exist (a save killed mid-way). A live pid's,
    this process's included, is never touched: its save may be in flight. Call on the one
    process that writes checkpoints, before its first save."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        m = _STALE.fullmatch(name)
        path = os.path.join(output_dir, name)
        if m is None or not os.path.isdir(path) or os.path.islink(path):
            continue
        pid = int(m.group(2) or m.group(3))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.warning("removed %d unfinished checkpoint save(s) of processes that no longer run: %s",
                       len(removed), ", ".join(os.path.basename(p) for p in removed))
    return removed


def find_resumable(output_dir: str) -> Optional[str]:
    """The newest checkpoint that verifies; invalid ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            logger.warning("skipping invalid checkpoint: %s", e)
    return None


def read_torch(path: str, name: str, required: bool = True):
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    file_path = os.path.join(path, name)
    if not os.path.isfile(file_path):
        if required:
            raise CheckpointError(f"checkpoint {path!r} is missing {name}")
        return None
    try:
        # Not memory-mapped: optimizer state loaded on resume must own its memory, or the file
        # (deleted by rotation) stays mapped, its space is never freed and a change to it
        # would SIGBUS the trainer (optimizers' load_state_dict does not copy).
        return torch.load(file_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {file_path!r}: it contains pickled objects other than tensors and "
            f"plain containers, which could run code on load. fasttrain never writes such files; "
            f"do not trust this checkpoint. ({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad header, ...
        raise CheckpointError(f"could not read {file_path!r}: {e}") from None


def read_json(path: str, name: str) -> dict:
    file_path = os.path.join(path, name)
    try:
        with open(file_path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} is missing {name}") from None
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r}: {name} is not valid JSON ({e})") from None


def _model_shards(path: str) -> Optional[list]:
    """The shard files HF's index names (model.safetensors.index.json), when all are present."""
    index = os.path.join(path, MODEL_INDEX)
    if not os.path.isfile(index):
        return None
    try:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path!r}: {MODEL_INDEX} is not a valid index ({e})") from None
    missing = [name for name in shards if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise CheckpointError(f"checkpoint {path!r}: {MODEL_INDEX} names shards that are missing: {missing[:4]}")
    return shards


def _read_safetensors(file_path: str) -> tuple[dict, dict]:
    try:
        with safe_open(file_path, framework="pt") as f:  # memory-mapped, no full read
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{file_path!r} is not a valid safetensors file: {e}") from None


def read_model_state(path: str) -> dict:
    """The weights of a checkpoint: model.safetensors, or the shards HF's index names (a large
    model's checkpoint from HF's Trainer, or weights re-sharded after the save)."""
    file_path = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(file_path):
        shards = _model_shards(path)
        if not shards:
            raise CheckpointError(f"checkpoint {path!r} is missing {MODEL_FILE}")
        tensors = {}
        for name in shards:
            tensors.update(_read_safetensors(os.path.join(path, name))[0])
        return tensors
    tensors, meta = _read_safetensors(file_path)
    for alias, name in json.loads(meta.get("fasttrain_aliases", "{}")).items():
        tensors[alias] = tensors[name]
    return tensors


def check_shapes(model: torch.nn.Module, state: dict, path: str) -> None:
    """One sentence for a checkpoint of another model size, instead of torch's dump of every
    size mismatch. A model with its own load_state_dict decides what fits (it may resize a
    buffer, say); HF's Trainer leaves that to it too."""
    if type(model).load_state_dict is not torch.nn.Module.load_state_dict:
        return
    own = model.state_dict()
    for name, t in state.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"checkpoint {path!r} was written by a model of another shape: {name} is "
                f"{tuple(t.shape)} there and {tuple(own[name].shape)} here. Build the model with "
                f"the configuration the checkpoint was saved with (its config.json), or start "
                f"a new run in another output_dir")


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    state = read_model_state(path)
    check_shapes(model, state, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r} does not match the model: missing "
                              f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")


# ---------------------------------------------------------------- background saving
class AsyncSaver:
    """One background thread for checkpoint writes. At most one save is in flight: a new
    one first waits for the previous. A failure is re-raised on the training thread at the
    next `poll()`, `submit()` or `wait()`."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()

        def run():
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name="fasttrain-checkpoint", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def drain(self) -> None:
        """Join without raising (for cleanup while another error propagates)."""
        try:
            self.wait()
        except BaseException as e:  # noqa: BLE001
            logger.error("a background checkpoint save also failed: %s", e)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def snapshot(obj):
    """A host-memory copy of a state (nested dicts/lists of tensors), safe to serialise on
    another thread while training goes on mutating the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


# ---------------------------------------------------------------- rotation
def rotate(output_dir: str, save_total_limit: Optional[int], keep: Optional[str] = None) -> list[str]:
    """Delete all but the newest `save_total_limit` checkpoints. `keep` (the best one) is
    never deleted; it may then be kept in addition to the newest (as HF does), since the
    newest is what a resume needs."""
    if not save_total_limit:
        return []
    paths = list_checkpoints(output_dir)
    spared = set(paths[-save_total_limit:])
    if keep:
        spared |= {p for p in paths if os.path.abspath(p) == os.path.abspath(keep)}
    doomed = [p for p in paths if p not in spared]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
