"""Triton kernels behind the speed levers (imported only where Triton is installed)."""
