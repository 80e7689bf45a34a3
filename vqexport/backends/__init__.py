"""Runners: one interface to run a decoder step on any target (torch reference, ONNX Runtime)."""
