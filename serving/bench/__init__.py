"""mnist-bench: load generator, baselines (in-process ONNX Runtime ceiling, bare gRPC floor) and reports."""
