"""nadoo compiler: load a model, calibrate, chunk, quantize and write a .ndc bundle (needs torch/onnx)."""
