"""Counting what the Trainer dispatches, for the host-sync and ops-per-step tests.

Every device-to-host read (`.item()`, `int(t)`, `float(t)`, `bool(t)`, indexing with a 0-d
tensor, also from C++) reaches `aten._local_scalar_dense`; every kernel launch is an ATen op.
A TorchDispatchMode sees both, deterministically, on any machine. Per-step figures are the
difference of two runs of different lengths, so set-up and the final logging step cancel.
"""
import collections
import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

LOCAL_SCALAR_DENSE = "aten._local_scalar_dense.default"
# host reads made by transformers' model code itself (also counted in LOCAL_SCALAR_DENSE)
MODEL_READ = "host reads inside transformers"


def _inside_transformers() -> bool:
    return any("/transformers/" in frame.filename for frame in traceback.extract_stack())


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.host_to_device = 0  # copies whose source is on the CPU and target is not

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func)] += 1
        if str(func) == LOCAL_SCALAR_DENSE and _inside_transformers():
            self.ops[MODEL_READ] += 1  # the HF model's own code read it, not the Trainer
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            if (isinstance(src, torch.Tensor) and src.device.type == "cpu"
                    and dst.device.type != "cpu" and not kwargs.get("non_blocking", False)
                    and not (src.is_pinned() and kwargs.get("non_blocking"))):
                self.host_to_device += 1
        return out


def per_step(run, short: int, long: int) -> collections.Counter:
    """{op: dispatches per step} from run(steps) -> Counter over two lengths."""
    a, b = run(short), run(long)
    return collections.Counter({k: (b[k] - a[k]) / (long - short) for k in set(a) | set(b) if b[k] != a[k]})


@contextlib.contextmanager
def counting():
    mode = OpCounter()
    with mode:
        yield mode
