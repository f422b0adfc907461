"""Data: the memory-mapped token-file dataset, collation and the valid-label count
(`datasets.py`).

May import: torch, numpy.
"""
