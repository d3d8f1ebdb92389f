"""Triton kernels, each beside a plain-torch reference with the same signature.

Kept import-light (no torch or triton here): import the kernel modules themselves, or
`pdserve.kernels.dispatch`, which picks the Triton kernel or the reference for the device.
"""
