"""Runs one part in this process: `python -m fasttrain.cli.gpu_check.worker PART OUT_JSON`.

PART is 'module' or 'module:function' inside this package (function default `run`); it gets
a context dict ({'outdir': ..., 'deadline': time.time() by which it must be done, a few
seconds inside the runner's limit}) and returns a JSON-able dict with at least 'status'. Any
exception becomes status 'error' with the traceback's tail, so the runner always has a result.
"""
from __future__ import annotations

import importlib
import json
import sys
import time
import traceback


def main(argv=None) -> int:
    part, out_path, outdir, limit_s = (argv or sys.argv[1:])[:4]
    module_name, _, fn_name = part.partition(":")
    ctx = {"outdir": outdir, "deadline": time.time() + float(limit_s) - 8}
    try:
        module = importlib.import_module(f"fasttrain.cli.gpu_check.{module_name}")
        result = getattr(module, fn_name or "run")(ctx)
    except BaseException as e:  # noqa: BLE001 - report whatever ended the part
        tb = traceback.format_exc()
        result = {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:500]}",
                  "traceback": tb[-4000:]}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
