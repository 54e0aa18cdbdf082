"""What the admin UI needs from the running server, handed over by the app factory.

The admin layer sits beside the API layer and may not import it, so the composition root
passes the shared pieces (settings, database, key store, the ModelService, privacy policy,
request log, usage recorder, the folder `appliance bench` writes its figures to, the Batch
API's file and batch stores and a way to stop a batch the server runs) in this one object,
kept on `app.state.admin`. The admin's own services (users,
sessions, audit, deployments, export jobs, key groups) are built here from the database. Holds no logic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import Settings
from appliance.serving.service import ModelService
from appliance.store.admin_sessions import SessionStore
from appliance.store.admin_users import AdminUserStore
from appliance.store.audit import AuditLog, DeniedAuditLimiter
from appliance.store.batch_files import FileStore
from appliance.store.batch_store import BatchStore
from appliance.store.db import Database
from appliance.store.deployments import DeploymentStore
from appliance.store.export_jobs import ExportJobStore
from appliance.store.key_groups import GroupStore
from appliance.store.keys import KeyStore
from appliance.store.privacy import PrivacyPolicy
from appliance.store.request_log import RequestLog
from appliance.store.usage_recorder import UsageRecorder

if TYPE_CHECKING:
    from appliance.admin.dashboard import DashboardSampler
    from appliance.admin.exports import ExportRunner
    from appliance.admin.security import LoginThrottle
    from appliance.admin.setup_token import SetupToken


@dataclass
class AdminContext:
    settings: Settings
    database: Database
    keys: KeyStore
    models: ModelService
    privacy: PrivacyPolicy
    request_log: RequestLog
    usage: UsageRecorder
    #: `<state dir>/bench`: the measured throughputs that price usage (usage page).
    bench_dir: Path
    #: True when the server answers over HTTPS (cookies get the Secure flag).
    tls: bool = False
    #: The Batch API's files (prompt and answer text) and batches: the Batches and Privacy
    #: pages list and delete them. None: the admin was built without them (pages say so).
    files: FileStore | None = None
    batches: BatchStore | None = None
    #: Stop a batch this server runs now (the runner's `cancel`); None while the Batch API is
    #: off. A cancel written to the database is otherwise seen at the runner's next heartbeat.
    cancel_batch: Callable[[str], None] | None = None
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.users = AdminUserStore(self.database)
        self.sessions = SessionStore(self.database)
        self.audit = AuditLog(self.database)
        self.deployments = DeploymentStore(self.database)
        self.export_jobs = ExportJobStore(self.database)
        self.groups = GroupStore(self.database)
        # Built by install_admin (they need the modules that import this one).
        self.throttle: LoginThrottle
        self.denied_limiter: DeniedAuditLimiter
        self.setup_token: SetupToken
        self.sampler: DashboardSampler
        self.exports: ExportRunner
