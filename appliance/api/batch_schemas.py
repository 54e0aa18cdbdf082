"""Request and response models of OpenAI's Files and Batch API (`/v1/files`, `/v1/batches`).

Shapes follow OpenAI's so its official client (`files.create`, `batches.create`,
`batches.retrieve`, `files.content`) works unchanged; `model` and `usage` on a batch are the
fields OpenAI added later, filled from the batch's own counts.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

#: Endpoints a batch may run (each line's `url` must be the batch's endpoint).
BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank"]
#: Most metadata pairs on a batch, and their lengths (OpenAI's limits).
METADATA_MAX_PAIRS = 16
METADATA_KEY_MAX_CHARS = 64
METADATA_VALUE_MAX_CHARS = 512


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"


class ListPage(BaseModel):
    """OpenAI's list envelope: one page, its first and last ids, and whether more follow."""

    object: Literal["list"] = "list"
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileList(ListPage):
    data: list[FileObject]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64, description="A file uploaded with purpose 'batch'.")
    endpoint: BatchEndpoint
    completion_window: str = Field(
        "24h", pattern=r"^[1-9][0-9]{0,3}h$", description="Hours the batch may take, e.g. '24h' (OpenAI's only value)."
    )
    metadata: dict[str, str] | None = Field(None, description="Up to 16 pairs of short strings, returned as given.")


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None


class BatchList(ListPage):
    data: list[BatchObject]


PageT = TypeVar("PageT", bound=ListPage)


def page_of(page_class: type[PageT], items: list[Any], limit: int) -> PageT:
    """The page of `items` (read with one row more than `limit`, to tell whether more follow)."""
    data = items[:limit]
    return page_class(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=len(items) > limit
    )
