"""Counts torch.compile work during a run and warns when it happens after warm-up.

A recompile costs a full compile (seconds to minutes) every time it happens, so one in the
middle of training makes the run quietly slower. `CompileMonitor` counts, from the moment
`start()` is called:

- compiles: Dynamo frame compilations (first compiles and recompiles);
- recompiles: compiles of code that already had compiled entries, each with the guard that
  failed (read from `torch._dynamo.utils.guard_failures`, which Dynamo fills whenever it
  explains a recompile, with or without `TORCH_LOGS=recompiles`);
- graph breaks: `torch._dynamo.utils.counters["graph_break"]`;
- graphs: `counters["stats"]["unique_graphs"]`;
- compile-cache hits and misses: Inductor's FX-graph cache lookups
  (`counters["inductor"]["fxgraph_cache_hit"]`, `["fxgraph_cache_miss"]`);
- compile time: torch's own compile-time accounting, `torch._dynamo.utils.
  calculate_time_spent()["total_wall_time"]` (its `entire_frame_compile` plus
  `entire_backward_compile` phases), read as a difference since `start()`: wall-clock
  seconds of every compilation, i.e. Dynamo tracing, AOTAutograd, Inductor code generation
  and the C++/Triton compiles it waits on, and the backward graph that AOTAutograd compiles
  lazily at the first backward. It is measured directly, not estimated as first-step time
  minus steady step time.

After `end_warmup()`, every compile logs a warning on the `fasttrain.compile.apply` logger naming
the cause (the failed guard, e.g. ``tensor 'x' size mismatch at index 1. expected 512,
actual 384``). Compiles you expect (the first evaluation compiles the eval-mode graphs)
go inside `with monitor.expect_compiles("first evaluation"):` and do not warn.

`torch._dynamo.reset()` drops Dynamo's callbacks and recompile reasons; the monitor
re-registers itself on the next call of any of its methods.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import torch
import torch._dynamo
from torch._dynamo.utils import counters

logger = logging.getLogger("fasttrain.compile.apply")

_DYNAMO_TRIGGER = "DYNAMO"


def _guard_failures() -> dict:
    # code object -> list of reason strings, appended by Dynamo on every recompile.
    return getattr(torch._dynamo.utils, "guard_failures", {})


# stats() name -> (counters group, key); key None sums the whole group.
_COUNTED = {
    "graph_breaks": ("graph_break", None),
    "graphs": ("stats", "unique_graphs"),
    "cache_hits": ("inductor", "fxgraph_cache_hit"),
    "cache_misses": ("inductor", "fxgraph_cache_miss"),
}


def _read_counters() -> dict[str, int]:
    values = {}
    for name, (group, key) in _COUNTED.items():
        bucket = counters[group]
        values[name] = sum(bucket.values()) if key is None else bucket[key]
    return values


def _torch_compile_seconds() -> float:
    return torch._dynamo.utils.calculate_time_spent().get("total_wall_time", 0.0)


def _describe_code(code) -> str:
    filename = getattr(code, "co_filename", "?").rsplit("/", 1)[-1]
    return f"{getattr(code, 'co_name', '?')} ({filename}:{getattr(code, 'co_firstlineno', '?')})"


def _first_line(reason: str) -> str:
    # "0/1: tensor 'x' size mismatch ... # source  # file:line\nUser stack trace: ..."
    line = reason.split("\n", 1)[0]
    return " ".join(line.split())


class CompileMonitor:
    """Counts compiles, recompiles and graph breaks; warns on compiles after warm-up.

    Usage::

        monitor = CompileMonitor().start()
        ...  # warm-up steps: every compile is expected here
        monitor.end_warmup()
        ...  # a recompile now logs a warning naming the failed guard
        logs.update(monitor.stats())
        monitor.stop()
    """

    def __init__(self, log: logging.Logger | None = None):
        """`log`: where warnings go (default: the `fasttrain.compile.apply` logger)."""
        self._log = log or logger
        self._lock = threading.Lock()
        self._started = False
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.compiles = 0
        self.recompiles = 0
        self.compile_time_s = 0.0
        self.warmup_compile_time_s = 0.0
        self.compiles_after_warmup = 0
        self.recompiles_after_warmup = 0
        self.unexpected_compiles_after_warmup = 0  # the ones that warned (not in expect_compiles)
        self.recompile_reasons: list[str] = []
        self.warnings: list[str] = []
        self._warmup = True
        self._expected: list[str] = []
        self._time_seen = 0.0  # last value of torch's cumulative compile time
        self._counters0: dict[str, int] = {}
        self._counters_final: dict[str, int] | None = None

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> CompileMonitor:
        """Begin counting (compiles before this call are not counted). Returns self."""
        if self._started:
            raise RuntimeError("CompileMonitor.start() called twice; call stop() first")
        self._reset_counts()
        self._counters0 = _read_counters()
        self._time_seen = _torch_compile_seconds()
        self._seen_failures = self._failure_counts()
        self._register()
        self._started = True
        return self

    def stop(self) -> None:
        """Stop counting; the counts stay readable through `stats()`."""
        if not self._started:
            return
        self._counters_final = self._counted()
        self._update_time()
        self._unregister()
        self._started = False

    def end_warmup(self) -> None:
        """Declare warm-up over: from now on every compile logs a warning with its cause."""
        self._require_started("end_warmup")
        self._ensure_registered()
        self._update_time()
        self._warmup = False

    @contextlib.contextmanager
    def expect_compiles(self, why: str) -> Iterator[None]:
        """Compiles inside this block are counted but not warned about (e.g. first eval)."""
        self._expected.append(why)
        try:
            yield
        finally:
            self._expected.pop()

    def __enter__(self) -> CompileMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- results ---------------------------------------------------------------------
    def stats(self) -> dict:
        """Counts since `start()`, as plain numbers for a logging dict."""
        self._ensure_registered()
        if self._started:
            self._update_time()
        return {
            "compiles": self.compiles,
            "recompiles": self.recompiles,
            "recompiles_after_warmup": self.recompiles_after_warmup,
            "compiles_after_warmup": self.compiles_after_warmup,
            "unexpected_compiles_after_warmup": self.unexpected_compiles_after_warmup,
            **self._counted(),
            "compile_time_s": round(self.compile_time_s, 3),
            "warmup_compile_time_s": round(self.warmup_compile_time_s, 3),
        }

    def _counted(self) -> dict[str, int]:
        """Dynamo/Inductor counter deltas since start() (frozen at stop())."""
        if self._counters_final is not None:
            return dict(self._counters_final)
        if not self._started:
            return {name: 0 for name in _COUNTED}
        now = _read_counters()
        return {name: max(0, now[name] - self._counters0.get(name, 0)) for name in now}

    # ---- Dynamo callbacks ------------------------------------------------------------
    def _register(self) -> None:
        if not hasattr(torch._dynamo, "callback_handler"):
            raise RuntimeError(
                f"CompileMonitor needs torch._dynamo.callback_handler (torch>=2.6); this is "
                f"torch {torch.__version__}: upgrade torch or run without the monitor"
            )
        handler = torch._dynamo.callback_handler
        handler.register_start_callback(self._on_start)
        handler.register_end_callback(self._on_end)

    def _unregister(self) -> None:
        handler = torch._dynamo.callback_handler
        if self._on_start in handler.start_callbacks:
            handler.remove_start_callback(self._on_start)
        if self._on_end in handler.end_callbacks:
            handler.remove_end_callback(self._on_end)

    def _ensure_registered(self) -> None:
        # torch._dynamo.reset() clears the callback list and the recompile reasons.
        if self._started and self._on_end not in torch._dynamo.callback_handler.end_callbacks:
            self._seen_failures = self._failure_counts()
            self._register()

    def _require_started(self, what: str) -> None:
        if not self._started:
            raise RuntimeError(f"CompileMonitor.{what}() before start(): call start() first")

    @staticmethod
    def _failure_counts() -> dict:
        return {code: len(reasons) for code, reasons in list(_guard_failures().items())}

    def _update_time(self) -> None:
        # Torch adds a compile's time when it finishes, so this runs at the next compile's
        # start and whenever the numbers are read. torch._dynamo.reset() zeroes the total.
        with self._lock:
            now = _torch_compile_seconds()
            if now < self._time_seen:
                self._time_seen = 0.0
            elapsed, self._time_seen = now - self._time_seen, now
            self.compile_time_s += elapsed
            if self._warmup:
                self.warmup_compile_time_s += elapsed

    def _on_start(self, args=None) -> None:
        self._update_time()

    def _on_end(self, args=None) -> None:
        with self._lock:
            trigger = getattr(getattr(args, "callback_trigger", None), "name", _DYNAMO_TRIGGER)
            if trigger != _DYNAMO_TRIGGER:
                return  # lazy backward compile, cudagraph recording: not a new Dynamo compile
            self.compiles += 1
            cause = self._new_guard_failure()
            if cause is not None:
                self.recompiles += 1
                self.recompile_reasons.append(cause)
            if not self._warmup:
                self._after_warmup(args, cause)

    def _new_guard_failure(self) -> str | None:
        """The guard failure Dynamo recorded for this compile, if it was a recompile."""
        found = None
        for code, reasons in list(_guard_failures().items()):
            seen = self._seen_failures.get(code, 0)
            if len(reasons) > seen and found is None:
                # Dynamo lists one reason per cached entry, newest entry first.
                found = f"{_describe_code(code)}: {_first_line(reasons[seen])}"
            self._seen_failures[code] = len(reasons)
        return found

    def _after_warmup(self, args, cause: str | None) -> None:
        self.compiles_after_warmup += 1
        if cause is not None:
            self.recompiles_after_warmup += 1
        if self._expected:
            return
        self.unexpected_compiles_after_warmup += 1
        compile_id = getattr(args, "compile_id", "?")
        if cause is not None:
            message = (
                f"torch.compile recompiled after warm-up (compile id {compile_id}), "
                f"cause: guard failed in {cause}. Each recompile costs a full compile; keep "
                "shapes static (fixed-length windows, drop_last=True) and Python scalars that "
                "change (learning rate, step) out of compiled code or in tensors."
            )
        else:
            message = (
                f"torch.compile compiled new code after warm-up (compile id {compile_id}), "
                "cause: a function or code path not run during warm-up (e.g. a first "
                "evaluation or a new model mode). Wrap expected ones in "
                "monitor.expect_compiles(...)."
            )
        self.warnings.append(message)
        self._log.warning(message)
