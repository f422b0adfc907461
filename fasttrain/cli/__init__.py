"""The command line: `fasttrain train|sample|bench|report` (`main.py`), the bench driver
and its worker (`bench.py`, `bench_worker.py`), the run report (`report.py`) and the
one-command GPU check (`gpu_check/`, docs/gpu_check.md).

The top layer: may import everything; nothing imports it.
"""


def main(argv=None):
    from fasttrain.cli.main import main as _main
    return _main(argv)
