"""Checkpoints: `checkpointer.py` saves and resumes a run from the components it is handed
(model, optimizer, LR schedule, scaler, loop state, TrainerState, callbacks, RNG), with a
`StateIO` seam for model/optimizer formats (full state today, sharded DCP next);
`storage.py` is the crash-safe on-disk format (temp dir, fsync, rename, manifest with
CRC-32, background saver); `rng.py` every RNG's state. Knows nothing of the Trainer.

May import: torch, safetensors, fasttrain.callbacks, fasttrain.distributed.
"""
