"""The memory budget's arithmetic (serving/budget.py): who is evicted to make room, in which
order, what may never be evicted, and what the refusal says. Plain numbers, no models."""

from __future__ import annotations

import pytest

from appliance.errors import MemoryBudgetExceeded
from appliance.serving.budget import MIB, Budget, Resident, check_fits_alone, estimate_bytes, plan_room, plan_start


def resident(name: str, mib: int, *, last_used: float, busy: bool = False, pinned: bool = False, device: str = "cpu") -> Resident:
    return Resident(name=name, bytes=mib * MIB, device=device, busy=busy, pinned=pinned, last_used=last_used)


def test_a_model_that_fits_evicts_nothing() -> None:
    loaded = [resident("a", 100, last_used=1.0)]
    assert plan_room("b", 100 * MIB, "cpu", loaded, Budget(host_bytes=256 * MIB)) == []


def test_idle_models_are_evicted_least_recently_used_first_and_only_as_many_as_needed() -> None:
    loaded = [resident("old", 100, last_used=1.0), resident("newer", 100, last_used=5.0), resident("newest", 100, last_used=9.0)]
    assert plan_room("x", 150 * MIB, "cpu", loaded, Budget(host_bytes=400 * MIB)) == ["old"]
    assert plan_room("x", 250 * MIB, "cpu", loaded, Budget(host_bytes=400 * MIB)) == ["old", "newer"]


def test_busy_and_pinned_models_are_never_evicted() -> None:
    loaded = [
        resident("busy", 100, last_used=1.0, busy=True),
        resident("pinned", 100, last_used=2.0, pinned=True),
        resident("idle", 100, last_used=9.0),
    ]
    assert plan_room("x", 150 * MIB, "cpu", loaded, Budget(host_bytes=350 * MIB)) == ["idle"]


def test_no_room_evicts_nothing_and_names_the_budget_and_its_holders() -> None:
    loaded = [resident("busy", 200, last_used=1.0, busy=True), resident("pinned", 100, last_used=2.0, pinned=True)]
    with pytest.raises(MemoryBudgetExceeded) as refused:
        plan_room("x", 150 * MIB, "cpu", loaded, Budget(host_bytes=400 * MIB))
    message = refused.value.message
    assert "memory budget is 400 MiB" in message and "busy (200 MiB, in use)" in message and "pinned (100 MiB, pinned)" in message
    assert refused.value.status_code == 503 and refused.value.retry_after_s > 0


def test_the_count_limit_evicts_even_when_bytes_would_fit() -> None:
    loaded = [resident("a", 10, last_used=1.0), resident("b", 10, last_used=2.0)]
    assert plan_room("c", 10 * MIB, "cpu", loaded, Budget(host_bytes=1 << 40, max_models=2)) == ["a"]


def test_gpu_and_host_budgets_are_separate() -> None:
    loaded = [resident("cpu-model", 300, last_used=1.0), resident("gpu-model", 300, last_used=2.0, device="cuda")]
    budget = Budget(host_bytes=400 * MIB, gpu_bytes=400 * MIB)
    assert plan_room("new-gpu", 200 * MIB, "cuda", loaded, budget) == ["gpu-model"], "a host model frees no GPU memory"
    assert plan_room("new-cpu", 50 * MIB, "cpu", loaded, budget) == []


def test_a_model_larger_than_the_whole_budget_can_never_fit() -> None:
    assert check_fits_alone("huge", 2 << 30, "cpu", Budget(host_bytes=1 << 30)) is not None
    assert "1024 MiB" in (check_fits_alone("huge", 2 << 30, "cpu", Budget(host_bytes=1 << 30)) or "")
    assert check_fits_alone("small", 1 << 20, "cpu", Budget(host_bytes=1 << 30)) is None


def test_the_estimate_counts_files_and_the_kv_reservation() -> None:
    assert estimate_bytes(100 * MIB, 50 * MIB) > 150 * MIB


def test_a_start_loads_in_order_what_fits_beside_the_models_before_it() -> None:
    plan = plan_start(
        [("a", 200 * MIB, "cpu"), ("b", 300 * MIB, "cpu"), ("c", 100 * MIB, "cpu"), ("huge", 900 * MIB, "cpu")],
        Budget(host_bytes=400 * MIB),
    )
    assert plan.held == ["a", "c"] and plan.on_demand == ["b"] and list(plan.never) == ["huge"]
