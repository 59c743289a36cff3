"""Trainer integration: Lightning CheckpointIO and callback, Hugging Face TrainerCallback,
a plain-loop helper, a torch DCP storage backend, and torchrun entry points.

Empty so far: these build on the checkpoint layer (``fmstore/checkpoint/``), which comes next.
"""
