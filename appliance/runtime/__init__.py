"""Tensor-model runtime: execution providers, ONNX Runtime sessions, dynamic batching.
Never imports torch, transformers or the export stage."""
