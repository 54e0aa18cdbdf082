"""Typed errors shared by every layer.

Each error carries a human-readable message and, where one exists, the offending field. The
HTTP layers map these types to status codes in one place per API family (api/errors.py); the
CLI maps them to one readable line and a non-zero exit. Never raise bare Exception for a
condition a user can cause.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error a user can cause or must be told about."""

    #: HTTP status this error maps to when it reaches an API boundary.
    status_code: int = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class ConfigError(ApplianceError):
    """A setting has a value the appliance cannot work with."""

    status_code = 400


class InvalidInput(ApplianceError):
    """A request or command argument is malformed; `field` names the culprit."""

    status_code = 400


class NotFound(ApplianceError):
    """The named thing (a model, a version, an API key, ...) does not exist."""

    status_code = 404


class ModelNotFound(NotFound):
    """No such model or version in the repository (or not loaded)."""

    status_code = 404


class ModelNotReady(ApplianceError):
    """The model exists but is loading, failed or being drained."""

    status_code = 503


class ModelRejected(ApplianceError):
    """A model file or manifest is corrupt, hostile or unsupported."""

    status_code = 400


class CapacityExceeded(ApplianceError):
    """The queue is full; the client should retry after `retry_after_s`."""

    status_code = 429

    def __init__(self, message: str, *, retry_after_s: float = 1.0, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class ReplicaUnavailable(ModelNotReady):
    """Scale-out (appliance.scale): the replica serving a request died or cannot be reached, or
    the model has no running replica while Ray restarts one. The request's work is lost; the
    client should retry after `retry_after_s`."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: float = 2.0, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class ModelCopyFailed(ModelNotReady):
    """Scale-out copy mode (appliance.scale): a model version could not be copied to this node
    from the node that holds the repository (a file vanished there, this node's disk is full).
    Nothing half-copied is ever served."""

    status_code = 503


class ChecksumMismatch(ModelCopyFailed):
    """A model file's SHA-256 after its copy to a node is not the repository's; the message
    names the file. The copy is thrown away, never served."""


class MemoryBudgetExceeded(ApplianceError):
    """A model cannot be loaded now: the memory budget is held by models that may not be
    evicted (busy or pinned). The client should retry after `retry_after_s`."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: float = 5.0, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ApplianceError):
    """The request did not complete within its deadline; its work was dropped."""

    status_code = 504


class Unauthorized(ApplianceError):
    """Missing, wrong, revoked or expired credentials."""

    status_code = 401


class Forbidden(ApplianceError):
    """Valid credentials without the needed scope, or a disallowed network."""

    status_code = 403


class PayloadTooLarge(ApplianceError):
    """A request body is over the configured limit."""

    status_code = 413


class ShuttingDown(ApplianceError):
    """The server is draining and accepts no new work."""

    status_code = 503


class ExportError(ApplianceError):
    """An export could not be completed; nothing was published."""

    status_code = 400


class ServiceInstallError(ApplianceError):
    """Installing or removing the systemd service failed at one named step."""

    status_code = 500


class ServerUnreachable(ApplianceError):
    """A server this command must talk to (e.g. `appliance bench`'s target) does not answer."""

    status_code = 502
