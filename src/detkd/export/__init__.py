"""Export to ONNX / TensorRT and the checks that gate it."""
