"""Op dispatch: the one place that picks, per op and device, the implementation that runs
(`dispatch.py`: AdamW, unscale + overflow check, gradient norm and clipping), the loader of
the compiled C++/CUDA ops (`native.py`) and the fused causal-LM loss for HF models (`loss.py`).

May import: torch, fasttrain.kernels.
"""

from fasttrain.ops import native as _native

# Load the compiled ops now, once per process: kernels/ picks its CPU cross-entropy by whether
# they are loaded, and a run must take one path on every step and after every resume.
_native.available()
