"""Scale-out on Ray Serve: the same appliance across several boxes (docs/SCALE.md).

The only package that imports Ray (an import-linter contract), installed with the `ray` extra;
the single-box server, its tests and the quickstart never load it. Layout:

- `plan.py`: the deployments, from the settings and the repository (no Ray: also for
  `appliance scale config`);
- `application.py`: the bound Ray Serve application; `ingress.py`: the appliance's own app as
  the ingress deployment; `replica.py`: one model per replica;
- `clients.py`: the serving protocols over deployment handles (what the ingress' doors use);
  `coalesce.py`: concurrent tensor calls to a model merged into few Ray calls;
  `wire.py`: what crosses the network; `cluster.py`: the replicas as the ingress sees them;
- `launch.py`: `appliance serve --ray ADDRESS|auto`.

`appliance.scale:app` (for `serve run` and `serve deploy`) is built on first access, from
the APPLIANCE_* environment and the TOML file, so importing this package reads nothing.
"""

from __future__ import annotations

from typing import Any

_built: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name == "app":
        if "app" not in _built:
            from appliance.scale.application import app_from_environment

            _built["app"] = app_from_environment()
        return _built["app"]
    raise AttributeError(f"module 'appliance.scale' has no attribute {name!r}")
