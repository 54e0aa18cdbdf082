"""Property-based fuzzing of every route in /openapi.json (Schemathesis): whatever it sends,
the server never answers 5xx, and every answer matches the schema /openapi.json declares. Runs against a real uvicorn with tiny models loaded."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from appliance.repository.store import ModelRepository
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import publish_adder, publish_embedder

#: Examples per operation: enough to hit each validation branch, small enough for a 2-core box.
EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("fuzz-state")
    repo = ModelRepository(state / "models")
    publish_adder(repo)
    publish_embedder(repo)
    with running_server(state, max_body_bytes=256 * 1024) as server:
        yield server


def _operations(server: RunningServer) -> list:
    loaded = schemathesis.openapi.from_dict(httpx.get(server.url("/openapi.json")).json())
    return [result.ok() for result in loaded.get_all_operations()]


def test_no_input_makes_the_server_answer_5xx(fuzz_server: RunningServer) -> None:
    """Schemathesis' pytest plugin does not run under this pytest, so each operation's
    strategy is driven by Hypothesis directly."""
    operations = [op for op in _operations(fuzz_server) if not op.path.endswith("/unload") and not op.path.startswith("/admin")]
    assert len(operations) >= 12
    failures: list[str] = []
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:  # noqa: ANN001
            response = case.call(base_url=fuzz_server.base_url, headers=fuzz_server.auth(), timeout=30)
            statuses.append(response.status_code)
            if response.status_code >= 500 and response.status_code != 503:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")
            # Whatever it answers must match what /openapi.json declares for that status.
            try:
                case.validate_response(response, checks=[response_schema_conformance, content_type_conformance])
            except Exception as exc:  # noqa: BLE001 - schemathesis raises a group of failures
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: schema: {str(exc)[:300]}")

        check()
    assert not failures, failures[:5]
    assert len(statuses) >= 5 * len(operations) and any(400 <= code < 500 for code in statuses)
