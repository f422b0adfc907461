"""Mixed precision: the autocast policy, master weights and the dynamic loss scaler
(`mixed.py`).

May import: torch, fasttrain.kernels, fasttrain.ops.
"""
