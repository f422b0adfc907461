"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e. before a kernel
module is imported, so it is set here, first. Tests that need the real (compiling) Triton
run in a subprocess with the variable removed. With FASTTRAIN_TEST_DEVICE=cuda (tests/_devices.py)
the kernel cases run on the GPU with compiled Triton, so the interpreter stays off.
"""
import os

if os.environ.get("FASTTRAIN_TEST_DEVICE", "cpu") == "cuda":
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    cases_on_cuda = os.environ.get("FASTTRAIN_TEST_DEVICE", "cpu") == "cuda"
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold the names of the
        # folders above the test, so a checkout in a folder named gpu skipped everything
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
        elif cases_on_cuda and item.get_closest_marker("kernel_cases") is not None:
            item.add_marker(pytest.mark.skip(reason="FASTTRAIN_TEST_DEVICE=cuda but no CUDA "
                                             "device here; unset it to run the cases on CPU"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores on CI: pin intra-op threads so timing-free tests are also reproducible.
    prev = torch.get_num_threads()
    yield
    torch.set_num_threads(prev)
