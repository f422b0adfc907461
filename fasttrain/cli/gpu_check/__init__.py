"""`python -m fasttrain.cli.gpu_check OUTDIR` (or `bash scripts/gpu_check.sh OUTDIR`): what the
GPU paths really do, in one command that installs nothing and stays under eight minutes.

Each part runs in its own subprocess under its own time limit (`runner.PARTS`), so a hang or a
crash costs that part only; the results go to OUTDIR/gpu_check.json and OUTDIR/summary.txt
(docs/gpu_check.md says how to read them). Without a GPU every part runs a CPU proxy or
reports "skipped: no GPU" with the reason: that dry run is what CI tests.

Modules: `runner` (order, time limits, the JSON and the summary), `worker` (runs one part),
`inventory` (discovers every Triton kernel and torch op that part 2 must cover),
`cases_plugin` (pytest plugin: which kernel_cases ran and how they ended), and one module per
part: `environment`, `correctness`, `host_sync`, `speed`, `dist_smoke`; `common` holds timing
and the tiny models and datasets they share.

The top layer (cli): may import everything; nothing imports it.
"""
