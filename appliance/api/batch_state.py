"""What the Files and Batch API routes share: the stores, the privacy policy, the runner.

One `BatchApi` per server, on `app.state.batch_api`, reached by the routes through
`BatchApiDep`. Text is stored only when the privacy mode allows it (checked here); which
files a deletion may remove (never one an unfinished batch still reads) is the store's rule
(store/batch_cleanup.py), shared with the admin UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from appliance.config import BatchApiSettings
from appliance.errors import Forbidden
from appliance.store import batch_cleanup
from appliance.store.batch_files import FileInfo, FileStore
from appliance.store.batch_store import BatchInfo, BatchStore
from appliance.store.keys import KeyInfo
from appliance.store.privacy import PrivacyPolicy

if TYPE_CHECKING:
    from appliance.api.batch_runner import BatchRunner

#: The privacy mode in which no text may be stored (and the Batch API refuses work).
TEXT_FORBIDDEN_MODE = "off"


def owner_id(key: KeyInfo | None) -> str:
    """The owner recorded on files and batches: the key's public prefix ('' when auth is off)."""
    return key.prefix if key is not None else ""


@dataclass
class BatchApi:
    settings: BatchApiSettings
    files: FileStore
    batches: BatchStore
    privacy: PrivacyPolicy
    runner: BatchRunner

    def refuse_if_text_forbidden(self) -> None:
        if self.privacy.mode == TEXT_FORBIDDEN_MODE:
            raise Forbidden(
                "the privacy mode is 'off': batch input and output files are prompt and answer text, which this box "
                "may not store; an admin can choose 'metadata' or 'full' on /admin/privacy"
            )

    def delete_file(self, file_id: str, key_id: str | None) -> FileInfo:
        return batch_cleanup.delete_file(self.batches, self.files, file_id, key_id)

    def delete_batch(self, batch_id: str) -> BatchInfo:
        """Forget a finished batch and delete its input, output and error files (the store's
        rule, which the admin UI's Batches page uses too)."""
        info, _deleted = batch_cleanup.delete_batch(self.batches, self.files, batch_id)
        return info


async def get_batch_api(request: Request) -> BatchApi:
    return request.app.state.batch_api


BatchApiDep = Annotated[BatchApi, Depends(get_batch_api)]
