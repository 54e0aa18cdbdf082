"""Decoder (text-generation) export: GGUF reading, the tokenizer fix from GGUF metadata, the
model-builder and Optimum routes, weight-only quantisation and evaluation against PyTorch.
Imported only by the export stage; torch and transformers are imported lazily inside.
"""
