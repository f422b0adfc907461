"""The command line: `fasttrain train|sample|bench|report` (`main.py`), the bench driver
and its worker (`bench.py`, `bench_worker.py`) and the run report (`report.py`).

The top layer: may import everything; nothing imports it.
"""


def main(argv=None):
    from fasttrain.cli.main import main as _main
    return _main(argv)
