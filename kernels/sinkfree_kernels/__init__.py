"""Triton attention kernels for sinkfree (depends only on torch and triton)."""
