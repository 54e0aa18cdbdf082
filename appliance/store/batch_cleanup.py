"""Deleting batches and batch files by the one rule the Batch API and the admin UI share: text
goes when its owner, an admin or the retention period says so, but never the input file of a
batch that has not finished (its runner still reads it; cancel the batch first).

A finished batch is deleted with its input, output and error files; "delete every batch file"
(the privacy page) deletes every file except the inputs of unfinished batches and says how
many files and bytes went and how many were kept. A batch row outlives a file deleted this
way: its output_file_id then answers 404, as after a client's own DELETE /v1/files. Never
imports the runtime or the APIs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.errors import InvalidInput, NotFound
from appliance.store.batch_files import FileInfo, FileStore
from appliance.store.batch_store import BatchInfo, BatchStore


@dataclass(frozen=True)
class FilesDeleted:
    """What a deletion removed: files and their bytes, and the files it had to keep."""

    files: int = 0
    bytes: int = 0
    #: Files left in place because an unfinished batch reads them.
    kept: int = 0


def _delete_each(files: FileStore, file_ids: Iterable[str], *, kept: int = 0) -> FilesDeleted:
    count = size = 0
    for file_id in file_ids:
        with contextlib.suppress(NotFound):  # deleted meanwhile by its owner or the purge
            info = files.delete(file_id, None)
            count += 1
            size += info.bytes
    return FilesDeleted(count, size, kept)


def delete_file(batches: BatchStore, files: FileStore, file_id: str, key_id: str | None) -> FileInfo:
    """Delete one file that `key_id` owns (None: any owner); refused (400) while an
    unfinished batch reads it, 404 for a file the caller does not own."""
    if file_id in batches.open_input_files():
        files.get(file_id, key_id)
        raise InvalidInput(f"file_id: {file_id} is the input of a batch that has not finished; cancel it first", field="file_id")
    return files.delete(file_id, key_id)


def delete_batch(batches: BatchStore, files: FileStore, batch_id: str) -> tuple[BatchInfo, FilesDeleted]:
    """Forget a finished batch (400 for an unfinished one, 404 for an unknown one) and delete
    its input, output and error files, except an input another unfinished batch still reads."""
    owned = batches.files_of(batch_id)
    info = batches.delete(batch_id)
    in_use = batches.open_input_files()
    wanted = [file_id for file_id in owned if file_id not in in_use]
    return info, _delete_each(files, wanted, kept=len(owned) - len(wanted))


def delete_all_files(batches: BatchStore, files: FileStore) -> FilesDeleted:
    """Delete every batch file except the inputs of unfinished batches (read after the list
    of files, so a batch created meanwhile keeps its input)."""
    listed = files.ids()
    in_use = batches.open_input_files()
    wanted = [file_id for file_id in listed if file_id not in in_use]
    return _delete_each(files, wanted, kept=len(listed) - len(wanted))
