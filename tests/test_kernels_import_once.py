"""The Triton kernels' torch.library ops are defined once per process.

From the repository root (pytest, `python -m`) `kernels/` is also reachable as a top-level
package, and transformers imports a top-level `kernels` whenever a model module is imported
(its probe for the unrelated hub-kernels package). A second import would redefine the ops
and free the first definition under callers that still hold it: a use-after-free.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fasttrain.kernels  # noqa: F401  (defines the ops)
from fasttrain.kernels._library import custom_op, op_defined

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_level_kernels_is_inert_and_defines_nothing():
    code = textwrap.dedent("""
        import importlib, sys
        import fasttrain.kernels as real
        import torch
        top = importlib.import_module("kernels")      # what transformers' probe does
        assert top is not real
        assert getattr(top, "__file__", None) is None, "looks installed to transformers' probe"
        assert not hasattr(top, "cross_entropy") and not hasattr(top, "fused_adamw_")
        try:
            import kernels.adamw  # noqa: F401
        except ImportError:
            pass
        else:
            raise AssertionError("kernels.adamw imported a second copy of a kernel module")
        # a model import from the repository root runs the probe; the ops stay the first ones
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import is_kernels_available
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
        assert not is_kernels_available()
        x = torch.randn(5, 7)
        t = torch.randint(0, 7, (5,))
        got = real.cross_entropy(x, t)
        want = torch.nn.functional.cross_entropy(x, t)
        assert torch.allclose(got, want, atol=1e-6), (got, want)
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_redefining_a_fasttrain_op_refuses_loudly():
    assert op_defined("fasttrain::cross_entropy")
    with pytest.raises(RuntimeError, match="fasttrain::cross_entropy is already defined"):
        @custom_op("fasttrain::cross_entropy", mutates_args=())
        def again(x: torch.Tensor) -> torch.Tensor:
            return x.clone()
    # the original op still works after the refusal
    x = torch.randn(3, 4)
    t = torch.tensor([0, 3, 1])
    loss, _ = torch.ops.fasttrain.cross_entropy(x, t, -100, 0.0, 0.0, "mean", False)
    assert torch.allclose(loss,
                          torch.nn.functional.cross_entropy(x, t), atol=1e-6)


def test_a_new_op_name_is_accepted():
    assert not op_defined("fasttrain::_test_only_identity")

    @custom_op("fasttrain::_test_only_identity", mutates_args=())
    def ident(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    assert op_defined("fasttrain::_test_only_identity")
    assert torch.equal(ident(torch.arange(3.0)), torch.arange(3.0))
