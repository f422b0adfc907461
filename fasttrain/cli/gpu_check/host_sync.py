"""Part 3: no host sync outside logging steps, on the real device.

A short Trainer.train() of the built-in GPT and of an HF GPT-2, in the default config, bf16
and fp16 (+ loss scaler). A callback arms torch.cuda.set_sync_debug_mode at the start of
every step that is neither the first (warm-up: lazy allocations, cuBLAS handles) nor a
logging step nor the last, and disarms it at the step's end. It uses the "warn" level, which
flags the same calls as "error" but lets the run go on: every synchronising call is recorded
with the Python stack that made it (not only the first, and without the Trainer's clean-up
code tripping over the armed check), and any one fails the run.

Without a GPU the same runs count host reads (aten._local_scalar_dense, the op behind
.item()/float()/bool() of a tensor) with a TorchDispatchMode in the same windows: a CPU
proxy that catches reads but not blocking copies; bf16/fp16 are GPU-only here.
"""
from __future__ import annotations

import tempfile
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fasttrain.callbacks import TrainerCallback
from fasttrain.cli.gpu_check.common import builtin_gpt, has_gpu, hf_gpt2, token_dataset

STEPS, LOGGING_STEPS = 8, 4
CONFIGS = {"default": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}


class _CountHostReads(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.record("aten._local_scalar_dense", traceback.extract_stack()[:-1])
        return func(*args, **(kwargs or {}))


_SYNC_MESSAGE = "synchronizing CUDA operation"  # torch's warning for a flagged call
_SITES_KEPT = 5


def _site(stack: list) -> dict:
    """Who made the call: the innermost frame outside torch, warnings and this module decides
    ('transformers' for the HF model's own code, else 'fasttrain' / the file's package)."""
    owner = "unknown"
    for frame in reversed(stack):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or path.endswith(("gpu_check/host_sync.py", "/warnings.py")):
            continue
        owner = "transformers" if "/transformers/" in path else \
            "fasttrain" if "/fasttrain/" in path or "/kernels/" in path else path
        break
    return {"owner": owner, "stack": "".join(traceback.format_list(stack[-12:]))[-2500:]}


class SyncGuard(TrainerCallback):
    """Arms the check for the steps that must not sync; records which ones it watched and,
    on a GPU, every synchronising call made while armed (step, message, stack)."""

    def __init__(self, logging_steps: int, max_steps: int, warmup_steps: int = 1):
        self.logging_steps, self.max_steps, self.warmup = logging_steps, max_steps, warmup_steps
        self.checked: list[int] = []
        self.by_owner: dict[str, int] = {}  # synchronising calls (GPU) or host reads (CPU)
        self.syncs: list[dict] = []  # the first few of each owner, with their stacks
        self._counter = None
        self._armed = False
        self._show = None

    def record(self, message: str, stack: list) -> None:
        site = _site(stack)
        owner = site["owner"]
        self.by_owner[owner] = self.by_owner.get(owner, 0) + 1
        if self.by_owner[owner] <= _SITES_KEPT:
            self.syncs.append({"step": self.checked[-1], "message": message[:200], **site})

    def _show_warning(self, message, category, filename, lineno, file=None, line=None):
        if self._armed and _SYNC_MESSAGE in str(message):
            self.record(str(message), traceback.extract_stack()[:-1])
        elif self._show is not None:
            self._show(message, category, filename, lineno, file, line)

    def _arm(self):
        if has_gpu():
            self._show = warnings.showwarning
            warnings.showwarning = self._show_warning
            warnings.filterwarnings("always", message=f".*{_SYNC_MESSAGE}.*")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._counter = _CountHostReads(self.record)
            self._counter.__enter__()

    def disarm(self):
        if not self._armed:
            return
        self._armed = False
        if has_gpu():
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = self._show
        elif self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if step > self.warmup and step % self.logging_steps and step != self.max_steps:
            self.checked.append(step)
            self._armed = True
            self._arm()

    def on_step_end(self, args, state, control, **kwargs):
        self.disarm()


def _model(kind: str):
    size = dict(n_layer=2, n_embd=64, n_head=4, vocab=256, block=64)
    return builtin_gpt(**size) if kind == "builtin_gpt" else hf_gpt2(**size)


def train_once(kind: str, config: dict, outdir: str) -> dict:
    from fasttrain import Trainer, TrainingArguments

    seq = 64 if has_gpu() else 32
    args = TrainingArguments(output_dir=outdir, max_steps=STEPS, logging_steps=LOGGING_STEPS,
                             per_device_train_batch_size=4, learning_rate=1e-3,
                             save_strategy="no", report_to="none", disable_tqdm=True, **config)
    guard = SyncGuard(LOGGING_STEPS, STEPS)
    trainer = Trainer(model=_model(kind), args=args,
                      train_dataset=token_dataset(64, seq, 256), callbacks=[guard])
    try:
        trainer.train()
    except Exception as e:  # noqa: BLE001 - the sync error is the finding
        guard.disarm()
        return {"status": "fail", "checked_steps": guard.checked,
                "reason": f"{type(e).__name__}: {str(e)[:300]}",
                "where": traceback.format_exc()[-3000:]}
    finally:
        guard.disarm()
    # The model's own syncs (HF code) are reported, not failed: they are not the Trainer's.
    ours = {k: v for k, v in guard.by_owner.items() if k != "transformers"}
    result = {"checked_steps": guard.checked, "status": "fail" if ours else "pass",
              "by_owner": guard.by_owner, "model_syncs": guard.by_owner.get("transformers", 0)}
    what = "synchronising calls" if has_gpu() else "host reads"
    if ours:
        result["reason"] = f"{sum(ours.values())} {what} outside the model in steps {guard.checked}"
    if guard.syncs:
        result["where"] = guard.syncs
    return result


def run(ctx: dict) -> dict:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("builtin_gpt", "hf_gpt2"):
            for name, config in CONFIGS.items():
                key = f"{kind}/{name}"
                if config and not has_gpu():
                    runs[key] = {"status": "skipped", "reason": "skipped: no GPU (bf16/fp16 "
                                 "autocast with the loss scaler is checked on CUDA)"}
                    continue
                runs[key] = train_once(kind, config, f"{tmp}/{kind}-{name}")
    failed = [k for k, r in runs.items() if r["status"] not in ("pass", "skipped")]
    ran = [k for k, r in runs.items() if r["status"] != "skipped"]
    how = "set_sync_debug_mode('warn'), each call recorded" if has_gpu() \
        else "host-read count (CPU proxy)"
    model = {k: r["model_syncs"] for k, r in runs.items() if r.get("model_syncs")}
    return {"status": "fail" if failed else "pass", "method": how, "runs": runs,
            **({"reason": f"syncs in {failed}"} if failed else {}),
            "summary": f"{len(ran) - len(failed)}/{len(ran)} runs free of host syncs outside "
            f"logging steps ({how})" + (f"; syncing: {failed}" if failed else "")
            + (f"; the HF model's own (transformers code, not failed): {model}" if model else "")}
