"""Export jobs started from the admin UI: what was asked, which process runs it, how it ended.

The process itself is managed by the admin layer; this module only keeps the record, so the
Models page can show past jobs after a restart. Never imports the runtime or the APIs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update

from appliance.errors import NotFound
from appliance.store.admin_models import ExportJob
from appliance.store.audit import AuditLog
from appliance.store.db import Database

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobInfo:
    id: int
    source: str
    name: str
    quant: str
    #: `--kv-cache` the job passed: fp32 (the export's default) or int8.
    kv_cache: str
    task: str | None
    status: str
    exit_code: int | None
    log_file: str
    created_by: str
    created_at: datetime
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


def _info(row: ExportJob) -> JobInfo:
    return JobInfo(
        row.id, row.source, row.name, row.quant, row.kv_cache, row.task, row.status, row.exit_code, row.log_file,
        row.created_by, row.created_at, row.finished_at,
    )


class ExportJobStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def create(
        self, *, source: str, name: str, quant: str, kv_cache: str, task: str | None, log_file: str, actor: str, address: str
    ) -> JobInfo:
        row = ExportJob(
            source=source, name=name, quant=quant, kv_cache=kv_cache, task=task, status="queued", log_file=log_file,
            created_by=actor, created_at=datetime.now(UTC),
        )
        with self.database.session() as session:
            session.add(row)
            session.flush()
            AuditLog.record_in(
                session, "export.start", actor=actor, address=address, target=name,
                detail=f"job {row.id}: {source} as {quant}, KV cache {kv_cache}",
            )
            return _info(row)

    def started(self, job_id: int, pid: int, log_file: str) -> None:
        with self.database.session() as session:
            session.execute(
                update(ExportJob).where(ExportJob.id == job_id).values(status="running", pid=pid, log_file=log_file)
            )

    def finished(self, job_id: int, status: str, exit_code: int | None) -> JobInfo:
        with self.database.session() as session:
            row = session.get(ExportJob, job_id)
            if row is None:
                raise NotFound(f"job: no export job {job_id}", field="job")
            row.status, row.exit_code, row.finished_at = status, exit_code, datetime.now(UTC)
            AuditLog.record_in(
                session, "export.finish", actor="appliance", address="local", target=row.name,
                outcome="ok" if status == "succeeded" else "failed", detail=f"job {job_id}: {status} (exit {exit_code})",
            )
            return _info(row)

    def get(self, job_id: int) -> JobInfo:
        with self.database.session() as session:
            row = session.get(ExportJob, job_id)
            if row is None:
                raise NotFound(f"job: no export job {job_id}", field="job")
            return _info(row)

    def recent(self, limit: int = 20) -> list[JobInfo]:
        with self.database.session() as session:
            return [_info(row) for row in session.scalars(select(ExportJob).order_by(ExportJob.id.desc()).limit(limit))]

    def abandon_unfinished(self) -> int:
        """At start: jobs left running by a previous server process can no longer be followed."""
        with self.database.session() as session:
            result = session.execute(
                update(ExportJob)
                .where(ExportJob.status.in_(("queued", "running")))
                .values(status="failed", finished_at=datetime.now(UTC))
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]
