"""FastAPI application factory: wires settings, store, runtime, generation and the routes."""
