"""The trunk: transformers' decoder as the reference and as an ONNX graph whose output is the final hidden state."""
