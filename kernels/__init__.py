"""CUDA kernels for the codec's GPU path, and the code that builds and loads them.

Empty so far: the kernels (byte-plane split/merge, XOR delta, exponent histograms,
blockwise int8 quantization) arrive with the compression work, each with a CPU reference
in ``fmstore/codec/`` that produces identical bytes.
"""
