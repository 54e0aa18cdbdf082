"""Switch off every network path of the libraries the appliance uses.

The appliance sends nothing off the box: no hub downloads, no telemetry, no update checks.
These flags are set by the appliance itself at import of the CLI, never left to the user's
environment. Must never import the libraries it configures (it runs before them).
"""

import os

OFFLINE_ENVIRONMENT: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
    # Not read by onnxruntime-genai 0.15.2 (kept for other releases); the next flag is the one
    # that works.
    "ORTGENAI_DISABLE_TELEMETRY": "1",
    # onnxruntime >= 1.32 (and onnxruntime-genai) otherwise keep a device id and a 1DS
    # telemetry event store in ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ for upload;
    # with this set neither is created (checked by a test).
    "ORT_DISABLE_TELEMETRY": "1",
    # Ray (scale-out, the `ray` extra) reports cluster usage to its vendor unless told not to;
    # the processes of a cluster `appliance serve --ray auto` starts inherit this.
    "RAY_USAGE_STATS_ENABLED": "0",
}


def enforce_offline() -> None:
    """Force the offline flags, overriding whatever the environment says."""
    os.environ.update(OFFLINE_ENVIRONMENT)
