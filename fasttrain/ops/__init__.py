"""Op dispatch: the loader of the compiled C++/CUDA ops (`native.py`) and the fused
causal-LM loss for HF models (`loss.py`).

May import: torch, fasttrain.kernels.
"""
