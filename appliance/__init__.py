"""inference-appliance: serve quantised ONNX models on an on-prem box.

The package root must stay import-light: the server imports it, so nothing here may pull in
torch, transformers or onnxruntime.
"""

__version__ = "0.1.0"
