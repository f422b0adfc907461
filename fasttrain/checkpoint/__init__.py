"""Checkpoint storage: the crash-safe on-disk format (`storage.py`: temp dir, fsync, rename,
manifest with CRC-32, background saver). Knows nothing of the Trainer.

May import: torch, safetensors, fasttrain.distributed.
"""
