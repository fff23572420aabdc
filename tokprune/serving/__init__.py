"""A trained model in use: load, evaluate, predict, ONNX export, latency measurement."""
