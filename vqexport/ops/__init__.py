"""The fused VQLogits op: its contract, reference implementation, ONNX function body and ORT kernel."""
