"""Above the compiler core: ONNX export of a pruned model and onnxruntime latency benchmarks."""
