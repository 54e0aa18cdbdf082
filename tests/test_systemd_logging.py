"""Logs are one line per event on stderr, text for people and JSON for machines (journald)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.ops.logging import configure_logging, stderr_is_journal


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_format_writes_one_object_per_event_with_extra_fields() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    logging.getLogger("appliance.api").info("request done", extra={"model": "minilm", "latency_ms": 4.2})
    event = json.loads(stream.getvalue())
    assert event["level"] == "info"
    assert event["logger"] == "appliance.api"
    assert event["message"] == "request done"
    assert event["model"] == "minilm" and event["latency_ms"] == 4.2
    assert event["ts"].endswith("+00:00")


def test_traceback_stays_on_one_line_in_both_formats() -> None:
    for log_format in ("text", "json"):
        stream = io.StringIO()
        configure_logging(log_format, "info", stream)
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            logging.getLogger("appliance").exception("failed")
        output = stream.getvalue()
        assert output.count("\n") == 1, output
        assert "ValueError" in output


def test_text_format_names_level_logger_and_fields() -> None:
    stream = io.StringIO()
    configure_logging("text", "info", stream)
    logging.getLogger("appliance.runtime").warning("slow load", extra={"load_s": 3.5})
    line = stream.getvalue().strip()
    assert "WARNING appliance.runtime: slow load load_s=3.5" in line


def test_private_attributes_a_library_stamps_on_every_record_are_not_printed() -> None:
    """Ray's record factory adds `_ray_timestamp_ns` to every record once Ray is imported."""
    stream = io.StringIO()
    configure_logging("text", "info", stream)
    previous = logging.getLogRecordFactory()

    def stamping(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record._library_stamp = 123  # type: ignore[attr-defined]
        return record

    logging.setLogRecordFactory(stamping)
    try:
        logging.getLogger("appliance.runtime").warning("slow load", extra={"load_s": 3.5})
    finally:
        logging.setLogRecordFactory(previous)
    line = stream.getvalue().strip()
    assert line.endswith("slow load load_s=3.5") and "_library_stamp" not in line


def test_level_filters_debug_and_reconfiguring_does_not_duplicate_lines() -> None:
    stream = io.StringIO()
    configure_logging("text", "info", stream)
    configure_logging("text", "info", stream)
    logging.getLogger("appliance").debug("hidden")
    logging.getLogger("appliance").info("shown")
    assert stream.getvalue().count("shown") == 1
    assert "hidden" not in stream.getvalue()


def test_uvicorn_lines_go_through_the_same_handler() -> None:
    logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler(io.StringIO()))
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    logging.getLogger("uvicorn.error").info("Started server process")
    assert json.loads(stream.getvalue())["logger"] == "uvicorn.error"
    assert logging.getLogger("uvicorn.error").handlers == []


def test_journal_stream_gets_syslog_priorities_and_no_timestamp(tmp_path: Path) -> None:
    log_file = tmp_path / "journal.txt"
    code = (
        "import logging, os, sys\n"
        "st = os.fstat(2)\n"
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "from appliance.ops.logging import configure_logging\n"
        "configure_logging('text', 'info')\n"
        "logging.getLogger('appliance').error('disk full')\n"
        "logging.getLogger('appliance').info('ready')\n"
    )
    with log_file.open("w") as stderr:
        subprocess.run([sys.executable, "-c", code], stderr=stderr, check=True, env=dict(os.environ))
    lines = log_file.read_text().splitlines()
    assert lines == ["<3>ERROR appliance: disk full", "<6>INFO appliance: ready"]


def test_a_plain_stream_is_not_mistaken_for_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not stderr_is_journal(io.StringIO())
    assert not stderr_is_journal(sys.__stderr__)


def test_uvicorn_color_copy_of_the_message_is_dropped() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 7, extra={"color_message": "\x1b[36m%d\x1b[0m"})
    event = json.loads(stream.getvalue())
    assert event["message"] == "Started server process [7]"
    assert "color_message" not in event
