"""The VQ-Logits head: its files (spec), torch module, ONNX builders, exact decoding and int8 quantization."""
