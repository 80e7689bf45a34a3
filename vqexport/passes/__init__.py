"""Graph passes: pure functions ModelProto -> ModelProto (ONNX only, no torch)."""
