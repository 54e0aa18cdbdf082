"""The serving layer: one ModelService (service.py) owns every model's lifecycle (load on
demand, keep-alive, least-recently-used eviction within a memory budget), and the doors reach
models only through its two protocols (protocols.py: `GenerationClient`, `TensorClient`).
Between api/admin above and runtime/generation below; api/ and admin/ import this package,
never the engines. Kept empty so that importing a light module (keep_alive, states, tasks)
does not load the engines.
"""
