"""Request and response models of the rerank routes (`/v1/rerank`, `/v2/rerank`, `/rerank`).

The shape Cohere, Jina, vLLM, llama.cpp's server and TEI share: a query, documents as strings
or `{text}` objects, `top_n`, `return_documents`; results sorted by relevance with their
index in the request. `max_tokens_per_doc` is Cohere's; `keep_alive` Ollama's; `truncated`
(indices of documents cut to fit the model) is ours, because truncation is never silent.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from appliance.api.openai_schemas import KeepAlive

#: Most documents one request may rank.
MAX_RERANK_DOCUMENTS = 10_000
#: Longest query and document accepted before tokenisation, in characters.
MAX_QUERY_CHARS = 20_000
MAX_DOCUMENT_CHARS = 200_000


class DocumentText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=MAX_DOCUMENT_CHARS)


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    documents: list[str | DocumentText] = Field(
        max_length=MAX_RERANK_DOCUMENTS, description="Strings, or objects with a `text` field."
    )
    top_n: int | None = Field(None, ge=1, description="Return only the n most relevant (default: all).")
    return_documents: bool = Field(True, description="Echo each result's document text.")
    max_tokens_per_doc: int | None = Field(None, ge=1, le=1_000_000, description="Cut each document to this many tokens.")
    keep_alive: KeepAlive = None

    def texts(self) -> list[str]:
        return [document if isinstance(document, str) else document.text for document in self.documents]


class RerankResultItem(BaseModel):
    index: int
    relevance_score: float
    document: DocumentText | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResultItem]
    usage: RerankUsage
    truncated: list[int] = Field(
        default_factory=list, description="Indices of documents cut to fit the model's max length (never silent)."
    )
