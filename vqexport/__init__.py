"""vqexport: ship VQ-Logits language models to devices (ONNX, ONNX Runtime), verified against PyTorch."""

__version__ = "0.1.0"
