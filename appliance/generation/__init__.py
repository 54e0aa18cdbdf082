"""LLM generation: tokenizer, chat templates, KV cache, continuous-batching scheduler,
speculative decoding. Runs on ONNX Runtime only; never imports torch or transformers."""
