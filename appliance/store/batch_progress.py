"""A running batch's output and error lines, appended to two files in its work folder as lines
finish; these files are the truth a resumed batch starts from.

Each finished line is one JSON line, written and fsynced before the next counter update, so a
line is either durably done or will be run again — never lost, never twice. A kill -9 in the
middle of a write leaves a torn last line: `recover` cuts it off (that line runs again) and
returns which custom ids are done and the counters they add up to. When the batch ends the two
files become its output and error files by a rename (no copy of the text). Never imports the
runtime or the APIs.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from appliance.store.batch_files import DIR_MODE, FILE_MODE
from appliance.store.batch_store import Progress

OUTPUT_NAME = "output.jsonl"
ERROR_NAME = "errors.jsonl"
#: Characters JSON leaves raw inside strings but common line splitters (Python's
#: str.splitlines, some JSON Lines readers) treat as line ends: written escaped, so one
#: answer is one line for every reader. They can only occur inside strings, so replacing them
#: in the encoded text is exact.
LINE_BREAKING_CHARACTERS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


@dataclass
class Recovered:
    done: set[str] = field(default_factory=set)
    #: The done lines whose answer was a success (in the output file).
    succeeded: set[str] = field(default_factory=set)
    progress: Progress = Progress()


def _usage_of(line: dict[str, Any]) -> tuple[int, int]:
    response = line.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else 0, completion if isinstance(completion, int) else 0)


def _read_complete_lines(path: Path) -> list[dict[str, Any]]:
    """The file's whole lines; a torn or unparsable tail is cut off the file."""
    if not path.exists():
        return []
    lines: list[dict[str, Any]] = []
    good_end = 0
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            try:
                value = json.loads(raw)
            except ValueError:
                break
            if not isinstance(value, dict):
                break
            lines.append(value)
            good_end += len(raw)
    if good_end != path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(good_end)
            os.fsync(handle.fileno())
    return lines


def encode_line(line: dict[str, Any]) -> bytes:
    """One JSON Lines record: UTF-8, compact, no character any line splitter breaks on."""
    text = json.dumps(line, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in LINE_BREAKING_CHARACTERS.items():
        text = text.replace(raw, escaped)
    return text.encode("utf-8") + b"\n"


class BatchProgress:
    """The two append-only files of one batch (thread-safe appends)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.output_path = folder / OUTPUT_NAME
        self.error_path = folder / ERROR_NAME
        self._lock = threading.Lock()
        self._handles: dict[bool, BinaryIO] = {}

    def recover(self) -> Recovered:
        self.folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        recovered = Recovered()
        completed = failed = prompt = completion = 0
        for path, is_error in ((self.output_path, False), (self.error_path, True)):
            for line in _read_complete_lines(path):
                custom_id = line.get("custom_id")
                if isinstance(custom_id, str):
                    recovered.done.add(custom_id)
                    if not is_error:
                        recovered.succeeded.add(custom_id)
                used_prompt, used_completion = _usage_of(line)
                prompt += used_prompt
                completion += used_completion
                if is_error:
                    failed += 1
                else:
                    completed += 1
        recovered.progress = Progress(completed, failed, prompt, completion)
        return recovered

    def append(self, line: dict[str, Any], *, error: bool) -> None:
        data = encode_line(line)
        with self._lock:
            handle = self._handles.get(error)
            if handle is None:
                path = self.error_path if error else self.output_path
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
                handle = self._handles[error] = os.fdopen(descriptor, "ab")
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()

    def line_count(self, *, error: bool) -> int:
        path = self.error_path if error else self.output_path
        if not path.exists():
            return 0
        with path.open("rb") as handle:
            return sum(1 for _ in handle)

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
