"""The ModelService on its own (no HTTP): loads on demand and shares one load between
concurrent first requests, evicts idle models least recently used first, never a busy or
pinned one, unloads after the keep-alive, refuses what can never fit, reloads a poisoned
session, and answers bad names and wrong routes with 400. Real ONNX Runtime sessions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import InvalidInput, MemoryBudgetExceeded, ModelNotFound, ModelNotReady
from appliance.repository.store import ModelRepository
from appliance.serving.budget import Budget
from appliance.serving.service import ModelService
from appliance.serving.states import ServingState
from appliance.serving.tasks import Route
from tests.helpers.serving import model_service
from tests.helpers.tiny_models import publish_adder, publish_embedder, publish_weighty

READY, EVICTED, UNAVAILABLE = ServingState.READY, ServingState.EVICTED, ServingState.UNAVAILABLE
ADD_INPUTS = {"INPUT0": np.ones((1, 4), np.float32), "INPUT1": np.ones((1, 4), np.float32)}


def run(scenario: object) -> None:
    asyncio.run(scenario)  # type: ignore[arg-type]


async def use(service: ModelService, name: str, *, keep_alive_s: float | None = None) -> None:
    """One request on `name` (a weighty model: X -> Y)."""
    async with await service.lease(name, Route.V2_INFER, keep_alive_s=keep_alive_s) as lease:
        await lease.client.infer({"X": np.ones((1, 512), np.float32)}, None, 10.0)


def states(service: ModelService) -> dict[str, ServingState]:
    return {status.name: status.state for status in service.statuses()}


def loads(service: ModelService, name: str) -> float:
    return service.metrics.loads.labels(model=name)._value.get()


def test_models_load_on_their_first_request_and_ten_concurrent_first_requests_share_one_load(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish_adder(ModelRepository(tmp_path / "models"))
        service = model_service(tmp_path, serving={"load_at_start": False})
        await service.start()
        assert states(service) == {"adder": EVICTED}

        async def request() -> list[float]:
            async with await service.lease("adder", Route.V2_INFER) as lease:
                result = await lease.client.infer(ADD_INPUTS, None, 10.0)
                return result.outputs["OUTPUT0"].tolist()

        answers = await asyncio.gather(*(request() for _ in range(10)))
        assert all(answer == [[2.0, 2.0, 2.0, 2.0]] for answer in answers)
        assert loads(service, "adder") == 1.0, "one load for ten concurrent first requests"
        status = service.status("adder")
        assert status.state is READY and status.measured and status.resident_bytes > 0 and status.inflight == 0
        await service.close(0)

    run(scenario())


def test_idle_models_are_evicted_least_recently_used_first_and_pinned_ones_never(tmp_path: Path) -> None:
    async def scenario() -> None:
        repository = ModelRepository(tmp_path / "models")
        for name in ("a", "b", "c"):
            publish_weighty(repository, name, megabytes=4)
        service = model_service(
            tmp_path, serving={"load_at_start": False, "max_loaded_models": 2, "models": {"a": {"pin": True}}}
        )
        await service.start()
        await use(service, "a")
        await use(service, "b")
        await use(service, "c")  # a is pinned: b goes
        assert states(service) == {"a": READY, "b": EVICTED, "c": READY}
        assert "evicted to make room for c" in (service.status("b").reason or "")
        await use(service, "b")  # c is the least recently used unpinned one
        assert states(service) == {"a": READY, "b": READY, "c": EVICTED}
        evicted = service.metrics.evictions.labels(model="b", reason="room")._value.get()
        assert evicted == 1.0
        await service.close(0)

    run(scenario())


def test_a_model_in_use_is_never_evicted_and_a_load_waits_for_room_then_gets_503(tmp_path: Path) -> None:
    async def scenario() -> None:
        repository = ModelRepository(tmp_path / "models")
        for name in ("a", "b"):
            publish_weighty(repository, name, megabytes=4)
        service = model_service(tmp_path, serving={"load_at_start": False, "max_loaded_models": 1, "max_load_wait_s": 0.3})
        await service.start()
        held = await service.lease("a", Route.V2_INFER)
        with pytest.raises(MemoryBudgetExceeded) as refused:
            await use(service, "b")
        assert refused.value.status_code == 503 and refused.value.retry_after_s > 0
        assert "a (" in refused.value.message and "in use" in refused.value.message
        assert states(service) == {"a": READY, "b": EVICTED}
        waiting = asyncio.ensure_future(use(service, "b"))
        await asyncio.sleep(0.1)
        held.release()  # a goes idle: b's waiting request evicts it and loads
        await waiting
        assert states(service) == {"a": EVICTED, "b": READY}
        await service.close(0)

    run(scenario())


def test_idle_models_unload_after_their_keep_alive_and_a_request_may_ask_zero(tmp_path: Path) -> None:
    async def scenario() -> None:
        repository = ModelRepository(tmp_path / "models")
        publish_weighty(repository, "short", megabytes=2)
        publish_weighty(repository, "pinned", megabytes=2)
        service = model_service(
            tmp_path, serving={"load_at_start": False, "keep_alive_s": 0.5, "models": {"pinned": {"pin": True}}}
        )
        await service.start()
        await use(service, "short")
        await use(service, "pinned")
        await asyncio.sleep(2.5)
        assert states(service) == {"short": EVICTED, "pinned": READY}
        assert "idle" in (service.status("short").reason or "")
        await use(service, "short", keep_alive_s=-1)
        await asyncio.sleep(2.0)
        assert states(service)["short"] is READY, "keep_alive -1 keeps it"
        await use(service, "short", keep_alive_s=0)
        await asyncio.sleep(0.3)
        assert states(service)["short"] is EVICTED, "keep_alive 0 unloads it right after the request"
        await service.close(0)

    run(scenario())


def test_a_model_larger_than_the_budget_is_unavailable_and_refused_when_deployed(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish_weighty(ModelRepository(tmp_path / "models"), "big", megabytes=8)
        service = model_service(tmp_path, serving={"memory_budget_bytes": 4 << 20})
        await service.start()
        while not service.settled():
            await asyncio.sleep(0.01)
        status = service.status("big")
        assert status.state is UNAVAILABLE and "more than the whole memory budget" in (status.reason or "")
        with pytest.raises(InvalidInput) as refused:
            await service.load("big")
        assert refused.value.field == "model" and "budget" in refused.value.message
        with pytest.raises(ModelNotReady):
            await use(service, "big")
        await service.close(0)

    run(scenario())


def test_names_and_routes_are_checked_before_anything_is_loaded(tmp_path: Path) -> None:
    async def scenario() -> None:
        repository = ModelRepository(tmp_path / "models")
        publish_adder(repository)
        service = model_service(tmp_path, serving={"load_at_start": False})
        await service.start()
        with pytest.raises(InvalidInput) as too_long:
            await service.lease("x" * 4096, Route.V2_INFER)
        assert too_long.value.field == "model" and len(too_long.value.message) < 200
        with pytest.raises(InvalidInput):
            await service.lease("../etc", Route.V2_INFER)
        with pytest.raises(ModelNotFound):
            await service.lease("ghost", Route.V2_INFER)
        with pytest.raises(InvalidInput) as wrong_route:
            await service.lease("adder", Route.CHAT)
        assert wrong_route.value.field == "model" and "tensor" in wrong_route.value.message
        assert states(service) == {"adder": EVICTED}, "a refused request loads nothing"
        await service.close(0)

    run(scenario())


def test_allocation_failure_at_run_time_reloads_the_model(tmp_path: Path) -> None:
    """An out-of-memory run cannot be provoked safely here, so the one session's `run` is
    wrapped to raise onnxruntime's allocation message once; everything else is real."""

    async def scenario() -> None:
        publish_embedder(ModelRepository(tmp_path / "models"))
        service = model_service(tmp_path)
        await service.start()
        while not service.settled():
            await asyncio.sleep(0.01)
        client = service.loaded_client("tiny-embed")
        assert client is not None
        runner = client.model.runner  # type: ignore[attr-defined]
        session = runner._sessions.get()

        class OnceFailing:
            def __init__(self) -> None:
                self.get_providers = session.get_providers

            def run(self, *args: object) -> object:
                raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer")

        runner._sessions.put(OnceFailing())
        with pytest.raises(ModelNotReady):
            await client.embed(["cat"], None, dimensions=None, timeout_s=5)  # type: ignore[attr-defined]
        for _ in range(500):
            if service.status("tiny-embed").state is READY:
                break
            await asyncio.sleep(0.01)
        reloaded = service.loaded_client("tiny-embed")
        assert reloaded is not None and reloaded is not client
        result = await reloaded.embed(["cat"], None, dimensions=None, timeout_s=5)  # type: ignore[attr-defined]
        assert result.vectors.shape == (1, 8)
        await service.close(0)

    run(scenario())


def test_the_budget_can_be_given_or_defaults_to_a_share_of_available_memory(tmp_path: Path) -> None:
    assert model_service(tmp_path, serving={"memory_budget_bytes": 64 << 20}).budget == Budget(host_bytes=64 << 20)
    default = model_service(tmp_path).budget
    assert default.host_bytes > 64 << 20 and default.gpu_bytes is None and default.max_models == 0


def test_the_lifecycle_diagram_renders_from_its_source_and_names_every_state(tmp_path: Path) -> None:
    import runpy

    source = runpy.run_path(str(Path(__file__).resolve().parents[1] / "docs" / "diagrams" / "serving_states.py"))
    assert set(source["STATES"]) == {state.value for state in ServingState}
    drawn = source["render"](tmp_path / "states.png")
    assert drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
