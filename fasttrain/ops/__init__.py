"""Op dispatch: the one place that picks, per op and device, the implementation that runs
(`dispatch.py`: AdamW, unscale + overflow check, gradient norm and clipping), the loader of
the compiled C++/CUDA ops (`native.py`) and the fused causal-LM loss for HF models (`loss.py`).

May import: torch, fasttrain.kernels.
"""
