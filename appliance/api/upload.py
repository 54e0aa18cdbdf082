"""Receiving a Files API upload (multipart/form-data with `file` and `purpose`) straight into
the state directory.

The file part streams into an `IncomingFile` as it arrives, chunk by chunk, off the event loop;
nothing is buffered whole in memory or spooled to /tmp (where prompt text would escape the
state directory and its privacy listing). The body's size cap is the GuardMiddleware's
upload limit. Other parts are small fields, capped at FIELD_MAX_BYTES.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from appliance.errors import InvalidInput
from appliance.store.batch_files import IncomingFile

#: Largest plain form field (purpose) accepted.
FIELD_MAX_BYTES = 256
FILE_FIELD = "file"
FORM_HINT = "send multipart/form-data with a 'file' part and a 'purpose' field"


@dataclass
class Upload:
    purpose: str
    filename: str
    file: IncomingFile


class _Parts:
    """The parser's callbacks: where each part's bytes go."""

    def __init__(self, incoming: IncomingFile) -> None:
        self.incoming = incoming
        self.fields: dict[str, bytearray] = {}
        self.filename: str | None = None
        self.saw_file = False
        self.pending: list[bytes] = []
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._target: str | None = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._target = None

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD:
            if self.saw_file:
                raise InvalidInput("file: send one file per upload", field="file")
            self.saw_file = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        else:
            self.fields.setdefault(name, bytearray())
        self._target = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target == FILE_FIELD:
            self.pending.append(bytes(data[start:end]))
        elif self._target is not None:
            value = self.fields[self._target]
            value.extend(data[start:end])
            if len(value) > FIELD_MAX_BYTES:
                raise InvalidInput(f"{self._target}: longer than {FIELD_MAX_BYTES} bytes", field=self._target)


async def receive_upload(request: Request, incoming: IncomingFile) -> Upload:
    """Parse the request into `incoming`; InvalidInput (400) names what is missing or wrong.
    The caller owns `incoming` (discards it on any error)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidInput(f"file: {FORM_HINT}", field="file")
    parts = _Parts(incoming)
    parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if parts.pending:
                data, parts.pending = b"".join(parts.pending), []
                await anyio.to_thread.run_sync(incoming.write, data)
        parser.finalize()
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several types for a malformed body
        raise InvalidInput(f"file: malformed multipart body ({exc.__class__.__name__}); {FORM_HINT}", field="file") from None
    if not parts.saw_file:
        raise InvalidInput(f"file: missing; {FORM_HINT}", field="file")
    purpose = parts.fields.get("purpose")
    if purpose is None:
        raise InvalidInput(f"purpose: missing; {FORM_HINT}", field="purpose")
    await anyio.to_thread.run_sync(incoming.finish)
    return Upload(purpose=purpose.decode("utf-8", "replace").strip(), filename=parts.filename or "", file=incoming)
