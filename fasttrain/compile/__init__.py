"""Compilation: per-block `torch.compile` (`apply.py`) and the recompile monitor that
explains each recompile (`monitor.py`).

May import: torch.
"""
