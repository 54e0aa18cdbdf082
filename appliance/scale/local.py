"""The environment of a local Ray cluster (`appliance serve --ray auto`), set before Ray is
imported: Ray reads its authentication settings once, when it loads.

Ray 2.60 authenticates the members of a cluster with a token. A local cluster gets a random
one of its own, kept in this process tree's environment (the cluster's processes inherit it),
instead of Ray's default of writing one to `~/.ray/auth_token`. A token the user set
(`RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH`) or `RAY_AUTH_MODE` is left as it is. Never imports Ray.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import MutableMapping

#: Random bytes of a local cluster's token.
TOKEN_BYTES = 32


def prepare_local_cluster(environ: MutableMapping[str, str] = os.environ) -> None:
    environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if "RAY_AUTH_MODE" in environ or environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    environ["RAY_AUTH_MODE"] = "token"
    environ["RAY_AUTH_TOKEN"] = secrets.token_hex(TOKEN_BYTES)
