"""Fixtures of the reliability suite: state directories holding the real default models.

The default models come from the session fixtures `exported_minilm` and `exported_smollm2`
(exported once per test run and shared with the rest of the suite) and are hard-linked into
each test's own state directory, so every test starts from an untouched copy in a second.
Setting RELIABILITY_MODELS_DIR to an already exported `models/` folder reuses it instead
(handy when iterating on this suite alone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.repository.store import ModelRepository
from tests.helpers.server import create_key
from tests.helpers.shared_exports import link_models
from tests.helpers.tiny_models import publish_adder, publish_embedder

EMBEDDING_MODEL = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"
TENSOR_MODEL = "adder"
#: Text that must never reach the database, a log file or crash output in metadata mode.
SECRET_PROMPT_MARKER = "okapi-canary-5813"


@dataclass(frozen=True)
class PreparedState:
    state_dir: Path
    key: str

    @property
    def db_path(self) -> Path:
        return self.state_dir / "appliance.db"


@pytest.fixture(scope="session")
def default_models_dir(request: pytest.FixtureRequest) -> Path:
    """A `models/` folder holding the default embedding model (int8) and LLM (int4)."""
    reused = os.environ.get("RELIABILITY_MODELS_DIR")
    if reused:
        return Path(reused)
    minilm = request.getfixturevalue("exported_minilm")
    smollm2 = request.getfixturevalue("exported_smollm2")
    combined = request.getfixturevalue("tmp_path_factory").mktemp("default-models") / "models"
    combined.mkdir()
    link_models(minilm.path.parent.parent, combined, (EMBEDDING_MODEL,))
    link_models(smollm2.root, combined, (CHAT_MODEL,))
    return combined


def _deploy_even_if_rejected(repository: ModelRepository, name: str) -> None:
    """Load tests are about serving, not about the quality gate: a version the export stage
    rejected is deployed with the admin's explicit override (a new manifest file is written
    in place of the hard link, so the shared export stays as it was)."""
    for version in repository.versions(name) if name in repository.names() else []:
        if not version.manifest.deployable:
            repository.set_deployable(name, version.version, True)


def prepare_state(state_dir: Path, models_dir: Path | None = None, *, tiny: bool = True) -> PreparedState:
    """A state directory with the default models (when `models_dir` is given), the tiny
    `adder` and `tiny-embed` models, and one API key with every scope."""
    state_dir.mkdir(parents=True, exist_ok=True)
    models = state_dir / "models"
    models.mkdir(exist_ok=True)
    if models_dir is not None:
        link_models(models_dir, models, (EMBEDDING_MODEL, CHAT_MODEL))
        _deploy_even_if_rejected(ModelRepository(models), CHAT_MODEL)
    if tiny:
        repository = ModelRepository(models)
        publish_adder(repository)
        publish_embedder(repository)
    key = create_key(state_dir, "reliability", ["infer", "admin", "metrics"])
    return PreparedState(state_dir=state_dir, key=key)


@pytest.fixture
def default_state(tmp_path: Path, default_models_dir: Path) -> PreparedState:
    return prepare_state(tmp_path / "state", default_models_dir)


@pytest.fixture
def tiny_state(tmp_path: Path) -> PreparedState:
    return prepare_state(tmp_path / "state")
