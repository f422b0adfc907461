"""pytest plugin (`-p fasttrain.cli.gpu_check.cases_plugin`): writes, to the JSON file named by
$FASTTRAIN_CASES_OUT, every collected `kernel_cases` or `gpu` test with the names it covers
(kernel_cases' arguments; none for a plain gpu test) and, once run, its outcome. Part 2 of gpu_check reads it per kernel; tests/test_gpu_check.py reads it
after `--collect-only` to check that every discovered kernel and op has a case."""
from __future__ import annotations

import json
import os

_cases: dict[str, dict] = {}


def pytest_collection_finish(session):
    for item in session.items:  # after -m deselection
        marker = item.get_closest_marker("kernel_cases")
        if marker is not None or item.get_closest_marker("gpu") is not None:
            covers = list(marker.args) if marker is not None else []
            _cases[item.nodeid] = {"covers": covers, "outcome": "not run"}


def pytest_runtest_logreport(report):
    case = _cases.get(report.nodeid)
    if case is None:
        return
    # a setup error or skip ends the case; otherwise the call phase decides
    if report.when == "call" or report.outcome != "passed":
        if case["outcome"] in ("not run", "passed"):
            case["outcome"] = report.outcome if report.when == "call" or report.outcome == "skipped" \
                else "error"
            if report.outcome != "passed":
                case["message"] = str(report.longrepr)[-1500:]
    if report.when == "teardown":
        _write()  # after every case: a run killed by its time limit still leaves its results


def pytest_sessionfinish(session, exitstatus):
    _write()


def _write():
    path = os.environ.get("FASTTRAIN_CASES_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(_cases, f, indent=1)
