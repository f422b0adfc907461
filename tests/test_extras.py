"""Optional features live behind extras; the core trains without them, and a feature used
without its extra says which extra to install."""
import os
import subprocess
import sys
import textwrap

import pytest

from fasttrain.extras import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ImportError, match=r"report_to=\"tensorboard\".*pip install 'fasttrain\[tensorboard\]'"):
        require("tensorboard", "tensorboard", 'report_to="tensorboard"')


def test_require_returns_the_module():
    assert require("json", "x", "y").dumps([1]) == "[1]"


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)


TRAIN = """
    import torch
    from fasttrain import Trainer, TrainingArguments
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
        def forward(self, x, labels=None):
            return {"loss": ((self.lin(x).squeeze(-1) - labels) ** 2).mean()}
    data = [{"x": torch.randn(4), "labels": torch.randn(())} for _ in range(8)]
    args = TrainingArguments(output_dir=OUT, max_steps=2, report_to=REPORT, disable_tqdm=True)
    print("loss", Trainer(M(), args, train_dataset=data).train().training_loss)
"""


def test_core_trains_without_triton_tensorboard_matplotlib(tmp_path):
    blocked = "import sys\nfor m in ('triton', 'tensorboard', 'matplotlib'): sys.modules[m] = None\n"
    code = blocked + f"OUT = {str(tmp_path)!r}\nREPORT = 'jsonl'\n" + textwrap.dedent(TRAIN)
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss " in proc.stdout


def test_tensorboard_without_its_extra_says_so(tmp_path):
    blocked = "import sys\nsys.modules['tensorboard'] = None\n"
    code = blocked + f"OUT = {str(tmp_path)!r}\nREPORT = 'tensorboard'\n" + textwrap.dedent(TRAIN)
    proc = _run(code)
    assert proc.returncode != 0
    assert "pip install 'fasttrain[tensorboard]'" in proc.stderr, proc.stderr[-3000:]
