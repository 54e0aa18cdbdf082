"""Operations support: systemd notification, logging setup, service installation.

Bottom layer (beside config and errors): may import only the standard library,
`appliance.config` and `appliance.errors`; never the runtime, the APIs or onnxruntime.
"""
