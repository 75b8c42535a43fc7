"""Ops of domain `onnxopt`: spec, NumPy reference, CuPy kernel, decomposition (../shared/DESIGN.md)."""
