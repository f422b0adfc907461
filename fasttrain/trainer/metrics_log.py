"""Where logged records go: a JSONL file (unless report_to is "none": then no log file at
all) and TensorBoard (report_to). The console (progress bar or printed records) belongs to
ProgressCallback/PrinterCallback.

Only the main process writes. Records arrive already on the host: the Trainer reads its
device-side accumulators once per logging step and hands plain floats here.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

from fasttrain.extras import require

LOG_FILE = "log_history.jsonl"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of crashing
    return value


class MetricsLogger:
    def __init__(self, args, is_main: bool, total_steps: int, resume: bool = False,
                 history: Optional[list] = None):
        """`history`: on resume, the restored log history; the JSONL file is rewritten to
        it, dropping records the interrupted run wrote after its checkpoint (the file's own
        records are kept where they agree with the history: they also hold the measurements,
        which the history does not)."""
        self.enabled = is_main
        self.args = args
        self.tb = None
        self.jsonl_path = os.path.join(args.output_dir, LOG_FILE)
        self.jsonl = bool(args.report_to)  # [] is report_to="none"
        if not self.enabled:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        if self.jsonl and (not resume or history is not None):
            kept = _measured_records(self.jsonl_path, history) if history else []
            tmp = self.jsonl_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for record in kept:
                    f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            os.replace(tmp, self.jsonl_path)

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        line = {k: _jsonable(v) for k, v in record.items()}
        line.setdefault("step", step)
        if self.jsonl:
            try:
                with open(self.jsonl_path, "a", encoding="utf-8") as f:  # a few lines per logging step
                    f.write(json.dumps(line) + "\n")
            except OSError as e:
                raise output_dir_error(self.args.output_dir, self.jsonl_path, e) from e
        if self.tb is None and "tensorboard" in self.args.report_to:
            require("tensorboard", "tensorboard", 'report_to="tensorboard"')
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=self.args.logging_dir)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    tag = key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}"
                    self.tb.add_scalar(tag, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _measured_records(path: str, history: list) -> list[dict]:
    """The records to keep on resume: the file's first len(history) records when each holds
    its history entry (the same HF keys and values, plus measurements), else `history`
    itself (a missing, foreign or edited file: the checkpoint's history is the truth)."""
    try:
        written = read_log_history(os.path.dirname(path) or ".")[:len(history)]
    except (OSError, ValueError):
        return list(history)
    if len(written) == len(history) and all(
            all(w.get(k) == _jsonable(v) for k, v in h.items()) for w, h in zip(written, history)):
        return written
    return list(history)


def output_dir_error(output_dir: str, path: str, e: OSError) -> OSError:
    """The error for a file of the run that cannot be written (a disk turned read-only, full,
    or permissions changed mid-run): the path, the cause and what to do."""
    return OSError(e.errno, f"cannot write {path!r} ({e.strerror or e}): output_dir {output_dir!r} must "
                   "stay writable while training. Make it writable again (or free space), then "
                   "resume from the last checkpoint with resume_from_checkpoint=True, or choose "
                   "another output_dir")


def read_log_history(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
