"""Request and response models of the Open Inference Protocol (KServe V2), as Triton speaks it.

Declared here so /openapi.json documents them; the infer route validates its JSON header with
`InferenceRequest` itself because the binary tensor data extension puts raw bytes after it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from appliance.repository.manifest import Datatype

Scalar = str | int | float | bool
Parameters = dict[str, Scalar]
Dim = Annotated[int, Field(ge=0, le=1 << 31)]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    shape: list[Dim] = Field(max_length=8)
    datatype: Datatype
    parameters: Parameters | None = None
    data: list[Any] | None = Field(None, description="Row-major values, flat or nested; absent with binary_data_size.")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=256)
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=64)
    outputs: list[RequestOutput] | None = Field(None, max_length=64)


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int]


class ProviderInfo(BaseModel):
    active: str
    session_providers: list[str]
    requested: list[str]
    fallbacks: dict[str, str] = Field(description="Why each preferred provider was not used.")
    intra_op_threads: int


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str = "onnxruntime_onnx"
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    task: str
    max_batch_size: int
    state: str = Field(description="READY, LOADING or UNAVAILABLE (the reason says why, e.g. evicted).")
    reason: str | None = Field(None, description="Why the model is not ready, when it is not.")
    provider: ProviderInfo | None = None


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool
    reason: str | None = None


class ErrorResponse(BaseModel):
    error: str


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ready: bool | None = Field(None, description="Only models that are ready (true) or not (false).")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: str
    reason: str | None = None


class RepositoryActionResponse(BaseModel):
    name: str
    state: str
    version: str | None = None
    reason: str | None = None
