"""Request and response models of the OpenAI-compatible routes served by this layer
(`/v1/models`, `/v1/embeddings`). Field names and shapes follow OpenAI's API so its official
client works with only `base_url` and `api_key` set; extra fields are additions, never renames.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Most inputs one embeddings request may carry (OpenAI's own limit).
MAX_EMBEDDING_INPUTS = 2048
#: Longest single input accepted before tokenisation, in characters.
MAX_INPUT_CHARS = 200_000

TokenIds = list[int]
#: Ollama's per-request keep-alive (an extension): seconds, or a duration such as "10m".
KeepAlive = Annotated[
    float | str | None,
    Field(
        description=(
            "How long the model stays loaded after this request: seconds or a duration such as '10m'; "
            "0 unloads it after this request, -1 keeps it loaded."
        ),
        union_mode="left_to_right",
    ),
]


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[TokenIds] | TokenIds = Field(
        description="A string, a list of strings, a list of token ids, or a list of such lists."
    )
    model: str = Field(min_length=1, max_length=128)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536, description="Truncate to this many dimensions (Matryoshka models).")
    user: str | None = Field(None, max_length=256)
    keep_alive: KeepAlive = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 with encoding_format=base64.")


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingsUsage
    truncated: list[int] = Field(
        default_factory=list, description="Indices of inputs cut to the model's max_length (truncation is never silent)."
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "appliance"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
