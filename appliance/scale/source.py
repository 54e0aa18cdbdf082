"""The `repository` deployment of copy mode, and the handle a replica copies through.

`RepositorySource` is one Ray Serve replica pinned to the head node (plan.py), which holds the
model repository in copy mode; it answers files.RepositoryFiles' two calls through Ray, so a
copy needs no network service of its own (Ray's object transfer carries the chunks, within the
cluster's authenticated connections). It reserves no CPU: it is idle except while a node copies,
and copying is disk- and network-bound. `HandleSource` is the replica's end: the same two
calls over the deployment's handle, its errors typed (wire.py says why replies carry them).
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from appliance.config import Settings
from appliance.errors import ApplianceError, ModelCopyFailed
from appliance.scale.files import RepositoryFiles, Wanted
from appliance.scale.wire import ReplicaIdentity, Reply, WireError


class RepositorySource:
    """The deployment class: the repository's files, from the node that holds them."""

    def __init__(self, settings: Settings) -> None:
        self.node_id = ray.get_runtime_context().get_node_id()
        self.identity = ReplicaIdentity(
            replica_id=serve.get_replica_context().replica_id.unique_id,
            node_id=self.node_id,
            node_ip=ray.util.get_node_ip_address(),
            pid=os.getpid(),
        )
        if not settings.models_dir.is_dir():
            raise RuntimeError(
                f"scale.model_files is 'copy', but the model repository {settings.models_dir} is not on the head node "
                f"({self.identity.node_ip}); in copy mode the head holds it: run `appliance serve --ray` there (docs/SCALE.md)"
            )
        self.files = RepositoryFiles(settings)

    async def wanted(self, model: str) -> Reply:
        try:
            wanted = await self.files.wanted(model)
        except ApplianceError as exc:
            return Reply(self.identity, error=WireError.of(exc))
        return Reply(self.identity, Wanted(wanted.model, wanted.serving, wanted.versions, source_node=self.node_id))

    async def chunk(self, model: str, version: int, path: str, offset: int, size: int) -> Reply:
        try:
            return Reply(self.identity, await self.files.chunk(model, version, path, offset, size))
        except ApplianceError as exc:
            return Reply(self.identity, error=WireError.of(exc))


class HandleSource:
    """files.FileSource over the `repository` deployment's handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def wanted(self, model: str) -> Wanted:
        return await self._call("wanted", f"the files of model {model}", model)

    async def chunk(self, model: str, version: int, path: str, offset: int, size: int) -> bytes:
        return await self._call("chunk", f"model {model} version {version}: {path}", model, version, path, offset, size)

    async def _call(self, method: str, what: str, *args: Any) -> Any:
        try:
            reply: Reply = await getattr(self.handle, method).remote(*args)
        except Exception as exc:  # noqa: BLE001 - Ray's errors are many; one line says which
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ModelCopyFailed(f"cannot fetch {what} from the repository node: {first}") from None
        return reply.unwrap()
