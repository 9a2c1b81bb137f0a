"""Building: checkpoints and text, ONNX export, quantization recipes, the NPU's parts and QNN context binaries."""
