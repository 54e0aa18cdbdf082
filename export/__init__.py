"""The export stage (installed as appliance.export): sources become optimised, quantised,
evaluated ONNX versions in the model repository. The only part of the project that may import
torch, transformers or optimum; nothing in the server imports it."""
