"""The real all-MiniLM-L6-v2 int8 (exported by the export stage) served end to end: the
official openai client gets embeddings whose cosine similarities make sense, and the V2
`sentence_embedding` output equals the OpenAI one (pooling lives in the graph)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.helpers.server import running_server

pytestmark = pytest.mark.slow


def test_real_minilm_serves_sensible_embeddings_to_the_openai_client(exported_minilm, state_dir: Path) -> None:  # noqa: ANN001
    target = state_dir / "models" / exported_minilm.name / str(exported_minilm.version)
    shutil.copytree(exported_minilm.path, target)
    with running_server(state_dir) as server:
        assert server.state(exported_minilm.name) == "ready"
        client = openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0)
        texts = [
            "A man is playing a guitar.",
            "Someone plays an acoustic guitar on stage.",
            "The stock market fell sharply today.",
        ]
        response = client.embeddings.create(model=exported_minilm.name, input=texts)
        vectors = np.array([item.embedding for item in response.data])
        assert vectors.shape == (3, 384)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
        related, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
        assert related > 0.5 and unrelated < 0.3 and related > unrelated + 0.3
        assert response.usage.prompt_tokens > 0
        # Alone or batched, a text gets (almost) the same vector: dynamic int8 quantisation
        # takes its activation scale over the whole batch, so batch-mates move it slightly.
        single = client.embeddings.create(model=exported_minilm.name, input=texts[0], encoding_format="float")
        assert float(np.dot(single.data[0].embedding, vectors[0])) > 0.99
        meta = httpx.get(server.url(f"/v2/models/{exported_minilm.name}"), headers=server.auth()).json()
        assert "sentence_embedding" in [o["name"] for o in meta["outputs"]]
