"""Which engine family serves a task, and which task each door can serve: decided here once.

Every "is this a generation model?" question in the server is answered by `family_of`, and
every "can this route serve this model?" by `check_route`, whose 400 names `model` and the
model's task. Never imports the engines.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from appliance.errors import InvalidInput

Family = Literal["generation", "tensor"]

GENERATION_TASKS = frozenset({"text-generation"})
TENSOR_TASKS = frozenset({"feature-extraction", "text-classification", "tensor"})


def family_of(task: str) -> Family:
    """The engine family that serves `task` (generation engines or the tensor runtime)."""
    return "generation" if task in GENERATION_TASKS else "tensor"


class Route(Enum):
    """A door into the models, with the tasks it can serve."""

    CHAT = ("/v1/chat/completions", GENERATION_TASKS)
    COMPLETIONS = ("/v1/completions", GENERATION_TASKS)
    EMBEDDINGS = ("/v1/embeddings", frozenset({"feature-extraction"}))
    RERANK = ("reranking", frozenset({"text-classification"}))
    V2_INFER = ("V2 inference", TENSOR_TASKS)

    def __init__(self, label: str, tasks: frozenset[str]) -> None:
        self.label = label
        self.tasks = tasks

    @property
    def family(self) -> Family:
        return "generation" if self.tasks <= GENERATION_TASKS else "tensor"


def check_route(name: str, task: str | None, route: Route) -> None:
    """400 naming `model` when `route` cannot serve a model of `task`."""
    if task is not None and task not in route.tasks:
        served = ", ".join(sorted(route.tasks))
        raise InvalidInput(f"model: {name!r} is a {task} model; {route.label} serves {served} models", field="model")
