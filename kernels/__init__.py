"""Device-side compute kernels (installed as appliance.kernels): small ONNX graph pieces (pooling,
normalisation, sampling) and the numpy references the tests compare them with."""
