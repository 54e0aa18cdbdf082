"""A batch's output lines stay one line each for every JSON Lines reader: an answer holding
U+0085, U+2028 or U+2029 (JSON leaves them raw, Python's str.splitlines breaks on them) is
written escaped, and reads back unchanged. Found when a tiny random model's answer held one and
a client's `text.splitlines()` cut the output file mid-record."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.store.batch_progress import BatchProgress

AWKWARD = "a\u2028b\x85c\u2029d\x1ce \u00e9 \U0001f600"


def test_answers_with_line_breaking_characters_stay_one_line_each(tmp_path: Path) -> None:
    progress = BatchProgress(tmp_path / "batch")
    progress.recover()
    for index in range(3):
        progress.append({"custom_id": f"req-{index}", "response": {"body": {"content": AWKWARD}}}, error=False)
    progress.close()

    text = progress.output_path.read_bytes().decode("utf-8")
    lines = text.splitlines()
    assert len(lines) == 3
    assert [json.loads(line)["response"]["body"]["content"] for line in lines] == [AWKWARD] * 3
    assert "\u00e9" in text, "other non-ASCII text stays UTF-8"
    assert BatchProgress(tmp_path / "batch").recover().done == {"req-0", "req-1", "req-2"}
