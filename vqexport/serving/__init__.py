"""Serving layouts beyond one process: a Triton Inference Server model repository."""
