"""HTTP APIs: Open Inference Protocol (KServe V2), OpenAI-compatible routes, metrics. Talks to
the runtime and generation layers through their small protocols; never imports export or torch."""
