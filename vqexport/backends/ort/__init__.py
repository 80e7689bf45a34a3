"""ONNX Runtime target: build (optimize, genai config) and run."""
