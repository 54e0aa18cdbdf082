"""The TensorClient of one loaded tensor model (see protocols.py for the contract): inference,
embeddings, and reranking with a cross-encoder.

Text is tokenised on the event loop only while it is small (a thread hop costs more than
tokenising a sentence); larger requests are tokenised in a worker thread with the batch call,
which releases the GIL, so one big request never stalls the others. The rows then go to the
runtime as text jobs, batched by length with other requests' rows. Never imports the API layer.
"""

from __future__ import annotations

import asyncio

import numpy as np

from appliance.errors import InvalidInput
from appliance.kernels.scoring import relevance_scores
from appliance.runtime.tensor_model import TensorModel
from appliance.runtime.tokenizer import Encoded, TextTokenizer
from appliance.repository.manifest import Manifest, ScoringSpec
from appliance.serving.protocols import EmbeddingResult, RerankResult, TensorModelInfo, TensorResult

#: Text up to this many characters per request is tokenised on the event loop.
INLINE_TOKENIZE_CHARS = 16_384
#: Smallest norm a re-normalised vector is divided by.
NORM_FLOOR = 1e-12


class LocalTensorClient:
    """A TensorClient over a TensorModel in this process."""

    def __init__(self, model: TensorModel) -> None:
        self.model = model
        manifest = model.manifest
        self._info = TensorModelInfo(
            name=manifest.name,
            version=manifest.version,
            task=manifest.task,
            inputs=list(manifest.inputs),
            outputs=list(manifest.outputs),
            max_batch_size=manifest.max_batch_size,
            embedding=manifest.embedding,
            provider=model.provider.as_json(),
        )

    def metadata(self) -> TensorModelInfo:
        return self._info

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, timeout_s: float, *, priority: int = 0
    ) -> TensorResult:
        result = await self.model.infer(inputs, outputs, timeout_s, priority=priority)
        return TensorResult(result.outputs, result.queue_us, result.compute_us)

    async def embed(
        self,
        texts: list[str] | None,
        token_ids: list[list[int]] | None,
        *,
        dimensions: int | None,
        timeout_s: float,
        priority: int = 0,
    ) -> EmbeddingResult:
        spec = self._info.embedding
        tokenizer = self.model.tokenizer
        if spec is None or tokenizer is None:
            raise InvalidInput(f"model: {self._info.name!r} is a {self._info.task} model without an embedding output", field="model")
        self._check_dimensions(dimensions)
        if texts is not None:
            if sum(len(text) for text in texts) <= INLINE_TOKENIZE_CHARS:
                encoded = tokenizer.encode_batch(texts)
            else:
                encoded = await asyncio.to_thread(tokenizer.encode_batch, texts)
        else:
            encoded = _checked_ids(tokenizer, token_ids or [])
        runs = await self.model.infer_text([item.ids for item in encoded], [spec.output], timeout_s, priority=priority)
        vectors = np.empty((len(encoded), spec.dimension), dtype=np.float32)
        for indices, result in runs:
            vectors[indices] = result.outputs[spec.output]
        return EmbeddingResult(
            vectors=self._cut(vectors, dimensions),
            prompt_tokens=sum(len(item.ids) for item in encoded),
            truncated=[index for index, item in enumerate(encoded) if item.truncated],
            queue_us=max(result.queue_us for _indices, result in runs),
            compute_us=max(result.compute_us for _indices, result in runs),
        )

    async def rerank(
        self, query: str, documents: list[str], *, max_tokens_per_doc: int | None, timeout_s: float, priority: int = 0
    ) -> RerankResult:
        manifest = self.model.manifest
        tokenizer = self.model.tokenizer
        if manifest.task != "text-classification" or tokenizer is None:
            raise InvalidInput(f"model: {self._info.name!r} is a {self._info.task} model; reranking needs a text-classification model (a cross-encoder)", field="model")
        scoring = scoring_of(manifest)
        if sum(len(document) for document in documents) + len(query) <= INLINE_TOKENIZE_CHARS:
            pairs = tokenizer.encode_pairs(query, documents, max_document_tokens=max_tokens_per_doc)
        else:
            pairs = await asyncio.to_thread(tokenizer.encode_pairs, query, documents, max_document_tokens=max_tokens_per_doc)
        runs = await self.model.infer_text(
            [pair.ids for pair in pairs], [scoring.output], timeout_s, types=[pair.type_ids for pair in pairs], priority=priority
        )
        scores = np.empty(len(pairs), dtype=np.float64)
        for indices, result in runs:
            scores[indices] = relevance_scores(result.outputs[scoring.output], scoring.activation, scoring.label)
        return RerankResult(
            scores=scores.tolist(),
            prompt_tokens=sum(len(pair.ids) for pair in pairs),
            truncated=[index for index, pair in enumerate(pairs) if pair.truncated],
            queue_us=max(result.queue_us for _indices, result in runs),
            compute_us=max(result.compute_us for _indices, result in runs),
        )

    def _check_dimensions(self, dimensions: int | None) -> None:
        """Refuse a `dimensions` the model cannot be cut to, before any work is queued."""
        spec = self._info.embedding
        assert spec is not None
        if dimensions is None or dimensions == spec.dimension:
            return
        if dimensions > spec.dimension:
            raise InvalidInput(f"dimensions: the model has {spec.dimension} dimensions, asked {dimensions}", field="dimensions")
        if spec.min_dimensions is None:
            raise InvalidInput(
                f"dimensions: model {self._info.name!r} does not support truncation (it has {spec.dimension})", field="dimensions"
            )
        if dimensions < spec.min_dimensions:
            raise InvalidInput(f"dimensions: must be between {spec.min_dimensions} and {spec.dimension}", field="dimensions")

    def _cut(self, vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
        """Matryoshka truncation to `dimensions`, re-normalised when the model normalises."""
        spec = self._info.embedding
        assert spec is not None
        if dimensions is None or dimensions == vectors.shape[1]:
            return vectors
        cut = vectors[:, :dimensions]
        if spec.normalize:
            cut = cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), NORM_FLOOR)
        return cut


def scoring_of(manifest: Manifest) -> ScoringSpec:
    """The manifest's scoring rule; older exports have none: one label means a sigmoid, several
    a softmax whose last label is the relevant one (what sentence-transformers' CrossEncoder
    does by default)."""
    if manifest.scoring is not None:
        return manifest.scoring
    labels = len(manifest.labels or [None])
    return ScoringSpec(activation="sigmoid" if labels == 1 else "softmax", label=max(0, labels - 1))


def _checked_ids(tokenizer: TextTokenizer, token_ids: list[list[int]]) -> list[Encoded]:
    """Token-id inputs checked against the vocabulary and cut to the model's max length."""
    limit = tokenizer.max_length
    encoded: list[Encoded] = []
    for position, ids in enumerate(token_ids):
        tokenizer.check_ids(ids, field="input", label=f"input[{position}]")
        encoded.append(Encoded(ids=ids if limit is None else ids[:limit], original_length=len(ids)))
    return encoded
