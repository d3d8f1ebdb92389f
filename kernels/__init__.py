"""Triton kernels, each beside a plain-torch reference with the same signature.

Kept import-light on purpose: transformers probes for a package called `kernels`, and this one must cost it
nothing (no torch or triton import here). Import the kernel modules themselves, or `kernels.dispatch`.
"""

__version__ = "0.1.0"
