"""Data: the memory-mapped token-file dataset, collation and the valid-label count
(`datasets.py`); example lengths for length-grouped sampling (`lengths.py`).

May import: torch, numpy.
"""
