"""The appliance's one settings tree.

Precedence: command line (passed as init arguments) > `APPLIANCE_*` environment > TOML file
(`--config FILE` or `APPLIANCE_CONFIG`) > defaults. Every field is typed, bounded and documented
in place; the CLI help and the README's configuration table are generated from these
descriptions (`appliance config --markdown`), not written twice. Never imports onnxruntime.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from appliance.errors import ConfigError

ProviderChoice = Literal["auto", "tensorrt", "cuda", "cpu"]
LoggingMode = Literal["off", "metadata", "full"]

DEFAULT_PORT = 8000
#: The state directory is readable by its owner only.
STATE_DIR_MODE = 0o700
SYSTEMD_STATE_DIR = Path("/var/lib/appliance")
#: Hours in an average year (365.25 days), so leap years are amortised too.
HOURS_PER_YEAR = 365.25 * 24
WATTS_PER_KILOWATT = 1000.0
#: Default stall limit (generation.decode_stall_factor); chosen from the sweep in
#: docs/BENCHMARKS.md (inter-token p99 against time to first token at 8 and 32 streams).
DEFAULT_DECODE_STALL_FACTOR = 6.0


def default_state_dir() -> Path:
    """`/var/lib/appliance` under systemd (it sets STATE_DIRECTORY), else the user's data dir."""
    systemd_dir = os.environ.get("STATE_DIRECTORY")
    if systemd_dir:
        return Path(systemd_dir.split(":")[0])
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "appliance"


class BatchingSettings(BaseModel):
    """Dynamic batching defaults for tensor models (a manifest may override per model)."""

    max_batch_size: int = Field(32, ge=1, le=1024, description="Largest batch one session run takes.")
    max_queue_delay_us: int = Field(
        2000, ge=0, le=1_000_000, description="How long the first request of a batch may wait for company."
    )
    max_queue_size: int = Field(
        256, ge=1, le=100_000, description="Requests waiting per model before new ones get 429."
    )
    instances: int = Field(
        1, ge=1, le=64, description="Parallel execution instances (sessions) per model."
    )
    enabled: bool = Field(True, description="Batch requests together (off: one request per run).")
    preferred_batch_sizes: list[int] = Field(
        default_factory=list, description="Batch sizes that start a run at once, without waiting out the delay."
    )

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _sizes_positive(cls, value: list[int]) -> list[int]:
        if any(size < 1 for size in value):
            raise ValueError("batch sizes must be >= 1")
        return sorted(set(value))


class GenerationSettings(BaseModel):
    """LLM engine settings."""

    kv_budget_bytes: int | None = Field(
        None, ge=1 << 20, description="Bytes of KV cache for all sequences; default: a quarter of free memory."
    )
    max_running_sequences: int = Field(16, ge=1, le=1024, description="Sequences decoded together.")
    max_waiting_sequences: int = Field(256, ge=1, le=100_000, description="Queued sequences before 429.")
    max_queue_wait_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description=(
            "Longest a request waits for a free sequence slot before it is refused with 429 "
            "(nothing sent yet, so the client can retry); default: a quarter of request_timeout_s."
        ),
    )
    prefill_chunk_tokens: int = Field(
        256, ge=16, le=65536, description="Prompt tokens prefilled per step (chunked prefill)."
    )
    decode_stall_factor: float = Field(
        DEFAULT_DECODE_STALL_FACTOR,
        ge=0,
        le=1000,
        description=(
            "While streams decode, a step that also prefills a prompt chunk is held to about this "
            "many decode steps of a lone sequence (timed on this box): the chunk is cut shorter "
            "(never under 16 tokens), so running streams do not stutter when others start; 0 "
            "turns the limit off (chunks are always prefill_chunk_tokens)."
        ),
    )
    max_tokens_limit: int = Field(4096, ge=1, le=1_000_000, description="Largest max_tokens a request may ask.")
    speculative: Literal["off", "prompt-lookup", "draft"] = Field(
        "prompt-lookup", description="Speculative decoding method for greedy requests."
    )
    prefix_cache: bool = Field(True, description="Reuse the KV of repeated prompt prefixes.")
    skip_forced_tokens: bool = Field(
        True,
        description=(
            "Tokens a grammar forces (JSON keys, punctuation) join the next model run instead of taking "
            "one step each (structured output, one sequence running)."
        ),
    )


#: Share of the memory available at start that the model budget takes by default: the rest is
#: the server itself (Python, ONNX Runtime, a few hundred MiB), request buffers, and the box.
DEFAULT_MEMORY_BUDGET_SHARE = 0.75
#: Seconds an idle model stays loaded by default (Ollama's 5 minutes).
DEFAULT_KEEP_ALIVE_S = 300.0


class ModelServingSettings(BaseModel):
    """Serving rules of one model (`[serving.models.NAME]` in TOML). The admin UI and `appliance
    models pin|unpin|keep-alive` store their choice in the database, which wins over these."""

    model_config = {"extra": "forbid"}

    pin: bool = Field(False, description="Never evict or unload this model while it is deployed.")
    keep_alive_s: float | None = Field(
        None, ge=-1, le=31_536_000, description="Idle seconds before this model is unloaded (-1: never); default serving.keep_alive_s."
    )
    tool_parser: Literal["hermes", "llama3_json", "mistral", "generic"] | None = Field(
        None, description="How this model writes tool calls; default: recognised from its chat template."
    )

    @field_validator("keep_alive_s")
    @classmethod
    def _keep_alive_range(cls, value: float | None) -> float | None:
        return _check_keep_alive(value)


def _check_keep_alive(value: float | None) -> float | None:
    if value is not None and -1 < value < 0:
        raise ValueError("must be -1 (never unload) or at least 0 seconds")
    return value


class ServingSettings(BaseModel):
    """How many models stay loaded, in how much memory, for how long (the serving layer)."""

    memory_budget_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description=(
            "Host memory the loaded models may hold together (weights, session arenas, KV reservations); "
            f"default: {DEFAULT_MEMORY_BUDGET_SHARE:.0%} of the memory available at start."
        ),
    )
    gpu_memory_budget_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="GPU memory the models placed on the GPU may hold together; default: no limit beyond the device's own.",
    )
    max_loaded_models: int = Field(0, ge=0, le=1024, description="Models loaded at once (0: no count limit, only the memory budget).")
    keep_alive_s: float = Field(
        DEFAULT_KEEP_ALIVE_S,
        ge=-1,
        le=31_536_000,
        description="Idle seconds before a model is unloaded to free its memory (-1: never; 0: right after each request).",
    )
    max_load_wait_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description=(
            "Longest a request waits for room in the budget while busy or pinned models hold it, before a 503 "
            "with Retry-After; default: a quarter of request_timeout_s."
        ),
    )
    load_at_start: bool = Field(
        True, description="Load deployable models at start while they fit the budget (the rest load on their first request)."
    )
    models: dict[str, ModelServingSettings] = Field(default_factory=dict, description="Per-model pin and keep-alive, by model name.")

    @field_validator("keep_alive_s")
    @classmethod
    def _keep_alive_range(cls, value: float) -> float:
        _check_keep_alive(value)
        return value


class BatchApiSettings(BaseModel):
    """The OpenAI Files and Batch API: bulk work run at the lowest priority in idle capacity."""

    enabled: bool = Field(True, description="Serve /v1/files and /v1/batches and run batches.")
    max_file_bytes: int = Field(
        200 << 20, ge=1024, le=1 << 34, description="Largest file one upload may hold (413 beyond)."
    )
    max_lines: int = Field(50_000, ge=1, le=1_000_000, description="Most request lines in one batch input file.")
    lines_in_flight: int = Field(
        16, ge=1, le=1024, description="Lines of a batch sent to the engines at once (fills continuous batching)."
    )
    max_completion_window_h: int = Field(
        168, ge=1, le=8760, description="Longest completion_window a batch may ask for, in hours (OpenAI's is 24h)."
    )


#: Ray Serve's proxies: one on the head node (clients use the head's address), or one per node
#: (a load balancer in front spreads clients over the nodes).
ProxyLocation = Literal["HeadOnly", "EveryNode"]
#: How HTTP reaches the ingress: through Ray Serve's proxy, or straight into the ingress replica.
IngressMode = Literal["proxy", "direct"]
ModelFilesMode = Literal["shared", "copy"]
#: Where a node keeps its copies of model versions in copy mode, under the state directory.
NODE_MODELS_DIR = "node-models"


class ScaleModelSettings(BaseModel):
    """How one model runs on a Ray cluster (`[scale.models.NAME]` in TOML): its replicas and
    what each replica reserves on its node. Models not listed get these defaults."""

    model_config = {"extra": "forbid"}

    deploy: bool = Field(True, description="Give this model a Ray deployment (false: it is not served in Ray mode).")
    replicas: int = Field(1, ge=1, le=1024, description="Replicas of this model while autoscaling is off.")
    min_replicas: int | None = Field(
        None, ge=1, le=1024, description="Autoscaling lower bound (default: 1); a model never scales to zero."
    )
    max_replicas: int | None = Field(
        None, ge=1, le=1024, description="Autoscaling upper bound; setting it turns autoscaling on for this model."
    )
    target_ongoing_requests: float = Field(
        2.0, gt=0, le=100_000, description="Autoscaling keeps about this many requests in flight per replica."
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description=(
            "Requests one replica takes at once; beyond, Ray's router holds them for another replica, up to as many "
            "again per ingress (then 429). Default: generation.max_running_sequences + "
            "generation.max_waiting_sequences, or batching.max_queue_size."
        ),
    )
    num_cpus: float = Field(1.0, ge=0, le=1024, description="CPUs each replica reserves on its node (Ray's `num_cpus`).")
    num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs each replica reserves (fractions share one GPU).")
    memory_bytes: int | None = Field(
        None, ge=1 << 20, description="Memory each replica reserves for Ray's scheduling (Ray's `memory`); default: none."
    )
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        le=100,
        description="At most this many of the model's replicas on one node (1: spread them, so a lost node costs one); default: no limit.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ScaleModelSettings:
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError("min_replicas needs max_replicas (autoscaling is on only with an upper bound)")
        if self.max_replicas is not None and (self.min_replicas or 1) > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    def with_changes(self, changes: dict[str, Any]) -> ScaleModelSettings:
        """A validated copy with `changes` (an admin's, from the UI) over these values;
        ValidationError names the field as the TOML file's would."""
        return ScaleModelSettings.model_validate({**self.model_dump(), **changes})


#: The per-model scale-out settings the admin UI may change (stored in the database, over the
#: configuration's): the replicas (fixed or autoscaling) and what each replica reserves.
ADMIN_SCALE_FIELDS = (
    "replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "num_cpus", "num_gpus", "memory_bytes"
)


class ScaleSettings(BaseModel):
    """Scale-out on a Ray Serve cluster (docs/SCALE.md): the same app as the ingress, one Ray
    deployment per model. Off unless `address` is set (`appliance serve --ray`); the single-box
    server never imports Ray."""

    address: str | None = Field(
        None,
        description=(
            "Ray cluster to serve on: 'auto' starts a local one for the server's lifetime, else the head's "
            "HOST:PORT (or ray://HOST:PORT); unset: one box, no Ray."
        ),
    )
    app_name: str = Field(
        "appliance", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Name of the Ray Serve application.",
    )
    proxy_location: ProxyLocation = Field(
        "HeadOnly", description="Where Ray Serve's HTTP proxy listens (host and port): the head node only, or every node."
    )
    ingress: IngressMode = Field(
        "direct",
        description=(
            "How clients reach the ingress: 'direct' (the ingress replica, pinned to the head node, listens on "
            "host:port itself: no proxy process, no request relayed through Ray; Ray Serve's experimental direct "
            "ingress, one ingress replica) or 'proxy' (Ray Serve's HTTP proxy on host:port forwards each request to the ingress "
            "replicas; several ingress replicas, proxy_location = EveryNode)."
        ),
    )
    ingress_replicas: int = Field(
        1, ge=1, le=64, description="Replicas of the ingress (the appliance's own app: auth, logging, routes, admin UI)."
    )
    ingress_cpus: float = Field(1.0, ge=0, le=1024, description="CPUs each ingress replica reserves.")
    health_check_period_s: float = Field(
        2.0, ge=0.5, le=60, description="How often Ray checks each replica; a hung one is replaced after 3 failed checks."
    )
    upscale_delay_s: float = Field(5.0, ge=0, le=3600, description="How long load must stay high before autoscaling adds a replica.")
    downscale_delay_s: float = Field(60.0, ge=0, le=3600, description="How long load must stay low before autoscaling removes a replica.")
    autoscaling_window_s: float = Field(
        10.0, gt=0, le=3600, description="Autoscaling averages the requests in flight per replica over this many seconds."
    )
    retry_after_s: float = Field(
        2.0, gt=0, le=600, description="Retry-After of the 503 answered when a replica died under a request or none is running."
    )
    stream_interval_tokens: int = Field(
        16,
        ge=1,
        le=1024,
        description=(
            "While a model replica streams several sequences, it sends each one's tokens to the ingress in groups of "
            "up to this many (one Ray item each; 1: every token on its own). A replica's only sequence, and each "
            "sequence's first and last token, are never held. Clients still receive every token, in order."
        ),
    )
    stream_interval_s: float = Field(
        0.1,
        ge=0,
        le=1.0,
        description="Longest a token waits for its group (stream_interval_tokens) before it is sent anyway (0: no token waits).",
    )
    model_files: ModelFilesMode = Field(
        "shared",
        description=(
            "How replicas reach the model repository: 'shared' (every node sees STATE_DIR/models at the same path, "
            "e.g. NFS) or 'copy' (a replica on another node than the head copies its model's serving version from "
            "the head through Ray, SHA-256-verified, into the node's copy_dir)."
        ),
    )
    copy_dir: Path | None = Field(
        None,
        description=(
            "Node-local folder of copied model versions in copy mode (default: STATE_DIR/node-models); a node's own "
            "APPLIANCE_SCALE__COPY_DIR, in the environment of its `ray start`, overrides it on that node."
        ),
    )
    models: dict[str, ScaleModelSettings] = Field(
        default_factory=dict, description="Replicas and resources per model, by model name."
    )

    @model_validator(mode="after")
    def _direct_ingress(self) -> ScaleSettings:
        if self.ingress == "direct" and self.ingress_replicas > 1:
            raise ValueError(
                f"ingress_replicas = {self.ingress_replicas} needs ingress = \"proxy\": with ingress = \"direct\" "
                "one ingress replica on the head node listens on host:port itself"
            )
        if self.ingress == "direct" and self.proxy_location == "EveryNode":
            raise ValueError(
                "proxy_location = \"EveryNode\" needs ingress = \"proxy\": with ingress = \"direct\" clients reach "
                "the head node's ingress replica, no proxy per node"
            )
        return self

    def model(self, name: str) -> ScaleModelSettings:
        """The settings of `name` (the defaults when it is not listed)."""
        return self.models.get(name) or ScaleModelSettings()

    def with_model_changes(self, changes: dict[str, dict[str, Any]]) -> ScaleSettings:
        """These settings with an admin's changes per model (`ADMIN_SCALE_FIELDS` only) over
        the configured ones; ConfigError names a model whose changed values no longer fit."""
        models = dict(self.models)
        for name, fields in changes.items():
            try:
                models[name] = self.model(name).with_changes({key: fields[key] for key in ADMIN_SCALE_FIELDS if key in fields})
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ConfigError(f"scale.models.{name} (changed in the admin UI): {first.get('msg')}", field=f"scale.models.{name}") from None
        return self.model_copy(update={"models": models})


class CostSettings(BaseModel):
    """Hardware cost model for cost per 1k tokens (dashboard and `appliance bench`)."""

    hardware_price: float = Field(1500.0, ge=0, description="Price of the box, in currency units.")
    lifetime_years: float = Field(3.0, gt=0, le=50, description="Years over which the box is amortised.")
    power_watts: float = Field(65.0, ge=0, le=100_000, description="Average power draw under load, watts.")
    electricity_price_kwh: float = Field(0.30, ge=0, description="Electricity price per kWh.")
    cloud_price_per_1k_tokens: float = Field(
        0.0006, ge=0, description="A cloud API's price per 1k generated tokens, for comparison."
    )
    cloud_price_per_1k_embedding_tokens: float = Field(
        0.00002, ge=0, description="A cloud embeddings API's price per 1k input tokens, for comparison."
    )
    currency: str = Field("EUR", min_length=1, max_length=8, description="Currency label for reports.")

    # The box's cost per hour of operation, in one place for the benchmark, the dashboard and
    # the usage report: amortised hardware plus electricity (the box costs this whether busy or not).
    @property
    def amortisation_per_h(self) -> float:
        """Hardware price spread over its lifetime, per hour."""
        return self.hardware_price / (self.lifetime_years * HOURS_PER_YEAR)

    @property
    def power_per_h(self) -> float:
        """Electricity at the stated power draw, per hour."""
        return self.power_watts / WATTS_PER_KILOWATT * self.electricity_price_kwh

    @property
    def per_hour(self) -> float:
        """What one hour of the box costs: amortisation plus power."""
        return self.amortisation_per_h + self.power_per_h


class Settings(BaseSettings):
    """Everything the appliance can be told. Field descriptions are the documentation."""

    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    state_dir: Path = Field(default_factory=default_state_dir, description="Models, database, caches.")
    config: Path | None = Field(None, description="TOML configuration file.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port for the API and admin UI.")
    auth: bool = Field(True, description="Require API keys (off only allowed on loopback).")
    providers: ProviderChoice = Field("auto", description="Execution providers: auto tries TensorRT, CUDA, CPU.")
    cuda_device_id: int = Field(0, ge=0, le=64, description="GPU used by CUDA and TensorRT.")
    cuda_mem_limit_bytes: int | None = Field(None, ge=1 << 20, description="CUDA arena limit.")
    trt_workspace_bytes: int = Field(2 << 30, ge=1 << 20, description="TensorRT workspace limit.")
    cpu_threads: int | None = Field(None, ge=1, le=1024, description="Intra-op threads; default: all cores.")
    max_body_bytes: int = Field(
        16 << 20, ge=1024, le=1 << 31, description="Largest request body accepted (413 beyond)."
    )
    request_timeout_s: float = Field(60.0, gt=0, le=3600, description="Deadline for one request (504 beyond).")
    drain_grace_s: float = Field(20.0, ge=0, le=600, description="Time in-flight work gets after SIGTERM.")
    repository_poll_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="How often the server looks for newly published or re-defaulted model versions and loads them (0: never).",
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in the state dir.")
    log_format: Literal["text", "json"] = Field("text", description="One line per event, text or JSON.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    logging_mode: LoggingMode = Field("metadata", description="Request logging: off, metadata or full.")
    log_retention_days: int = Field(
        7, ge=1, le=3650, description="Days `full` logging keeps prompts and completions before purging them."
    )
    admin_networks: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"], description="Networks allowed to the admin UI."
    )
    api_networks: list[str] = Field(
        default_factory=lambda: ["0.0.0.0/0", "::/0"], description="Networks allowed to the API."
    )
    tls_cert: Path | None = Field(None, description="TLS certificate (PEM).")
    tls_key: Path | None = Field(None, description="TLS private key (PEM).")
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    cost: CostSettings = Field(default_factory=CostSettings)
    batch_api: BatchApiSettings = Field(default_factory=BatchApiSettings)
    scale: ScaleSettings = Field(default_factory=ScaleSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = _config_file_from(init_settings, env_settings)
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @field_validator("admin_networks", "api_networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a network: {net!r}") from exc
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @model_validator(mode="after")
    def _one_batch_runner(self) -> Settings:
        if self.scale.ingress_replicas > 1 and self.batch_api.enabled:
            raise ValueError(
                f"scale.ingress_replicas is {self.scale.ingress_replicas}, but the Batch API runs batches in the "
                "ingress: more than one would run each batch twice; set batch_api.enabled = false"
            )
        return self

    @property
    def uses_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    def make_state_dir(self) -> Path:
        """Create the state directory, private to this user (0700), if it does not exist yet:
        it holds the database, key hashes, request logs and models. Every command that writes
        there calls this first, so whichever runs first creates it private."""
        if not self.state_dir.is_dir():
            self.state_dir.parent.mkdir(parents=True, exist_ok=True)
            self.state_dir.mkdir(mode=STATE_DIR_MODE, exist_ok=True)
            os.chmod(self.state_dir, STATE_DIR_MODE)  # whatever the umask says
        return self.state_dir

    # Derived paths: one place decides the layout of the state directory.
    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def node_models_dir(self) -> Path:
        """Scale-out copy mode: where a node keeps its copies of model versions."""
        return self.scale.copy_dir or self.state_dir / NODE_MODELS_DIR

    @property
    def batch_files_dir(self) -> Path:
        """Files API contents (batch inputs and outputs: prompt and answer text)."""
        return self.state_dir / "batch-files"

    @property
    def batch_work_dir(self) -> Path:
        """Running batches' progress files."""
        return self.state_dir / "batch-work"

    @property
    def trt_cache_dir(self) -> Path:
        return self.state_dir / "trt-cache"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'appliance.db'}"

    @property
    def listens_beyond_loopback(self) -> bool:
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host not in ("localhost",)


def _config_file_from(*sources: PydanticBaseSettingsSource) -> Path | None:
    for source in sources:
        try:
            values = source()
        except Exception:  # noqa: BLE001 - a broken env var is reported by the main validation
            continue
        value = values.get("config")
        if value:
            path = Path(value)
            if not path.is_file():
                raise ConfigError(f"config: file not found: {path}", field="config")
            return path
    return None


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from CLI overrides (None means 'not given'), env and TOML.

    Raises ConfigError with the offending field named, never a pydantic traceback.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ())) or "config"
        raise ConfigError(f"{field}: {first.get('msg', 'invalid value')}", field=field) from None
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"config: {exc}", field="config") from None
