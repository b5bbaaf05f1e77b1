"""Settings, read from the environment (prefix ``FLUXREDUX_``) and command-line flags.

Built once at the entry point and passed down; no module reads the environment itself.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ModelChoice = Literal["auto", "flux", "demo", "fake"]
MetricsAccess = Literal["open", "key", "off"]
Offload = Literal["none", "model", "sequential", "group"]
TextEncoderPolicy = Literal["keep", "unload"]
CompileMode = Literal["none", "transformer", "all"]
Quantization = Literal["none", "fp8", "int8", "nf4", "gguf"]
TextEncoderQuantization = Literal["none", "int8", "nf4"]
LogFormat = Literal["text", "json"]

# How long a SQLite write waits for another process's write lock before giving up: long
# enough for any of our own transactions (milliseconds), short enough to answer a 503 quickly.
DEFAULT_BUSY_TIMEOUT = 2.0
# An object store (S3) request: each try waits this long to connect and then for each read,
# and a request makes this many tries. An endpoint that accepts connections and then says
# nothing (wedged, partitioned) costs a caller about 2 x 3 s plus a short backoff, not the
# minutes of botocore's defaults: a create answers 503 quickly, a worker retries itself.
DEFAULT_STORAGE_TIMEOUT = 3.0
DEFAULT_STORAGE_ATTEMPTS = 2

# One entry of lora_sources: hf:owner/* (any repo of owner) or hf:owner/repo.
HUB_SOURCE = re.compile(
    r"^hf:(?P<owner>[A-Za-z0-9][A-Za-z0-9_.-]{0,95})/(?P<repo>\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,95})$"
)


def _source_entries(sources: str) -> list[str]:
    return [entry for entry in (part.strip() for part in sources.split(",")) if entry]


SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"
REDUX_REPO = "black-forest-labs/FLUX.1-Redux-dev"
TAEF1_REPO = "madebyollin/taef1"  # MIT, ~10 MB: step previews


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXREDUX_", extra="ignore")

    model: ModelChoice = Field(
        "auto",
        description="auto: the real model when a CUDA GPU is present, else the demo model. "
        "flux: the real FLUX.1 weights. demo: tiny random weights (outputs are noise). "
        "fake: no model and no weights: flat colours at once, for trying the API and for tests "
        "(and benchmarks of the service); needs neither torch nor a GPU.",
    )
    schnell_model: str = Field(
        SCHNELL_REPO, description="FLUX.1 [schnell]: a local diffusers folder or a Hugging Face repo id."
    )
    redux_model: str = Field(
        REDUX_REPO, description="FLUX.1 Redux prior: a local diffusers folder or a Hugging Face repo id."
    )
    preview_model: str = Field(
        TAEF1_REPO,
        description="TAEF1, the tiny FLUX autoencoder of step previews (input preview): a local "
        "diffusers folder or a Hugging Face repo id (fluxredux download --previews).",
    )
    offload: Offload = Field(
        "none",
        description="CUDA only. model: keep idle components in CPU RAM (saves ~10 GiB of GPU memory, "
        "slower); group: the transformer's blocks streamed to the GPU a group at a time, overlapped "
        "with compute on CUDA streams (diffusers group offloading); sequential: stream weights layer "
        "by layer (smallest GPU footprint, much slower).",
    )
    memory_profile: str = Field(
        "auto",
        description="auto: on a CUDA GPU, the fastest combination of quantize and offload that fits "
        "its free memory (docs/performance.md has the table), unless quantize or offload is given, "
        "which always wins; elsewhere nothing changes. A profile's name picks that one. manual: only "
        "quantize and offload as given.",
    )
    transformer_file: str | None = Field(
        None,
        description="quantize=gguf: the transformer as one GGUF checkpoint, a local path or a Hugging "
        "Face file as owner/repo/file.gguf (`fluxredux download --gguf Q8_0` fetches one).",
    )
    text_encoder_quantize: TextEncoderQuantization = Field(
        "none",
        description="The T5 text encoder a prompt loads (CLIP is small): int8 (torchao, weight-only) "
        "or nf4 (bitsandbytes, CUDA) to hold it in less memory.",
    )
    text_encoders: TextEncoderPolicy = Field(
        "keep",
        description="The text encoders (T5-XXL + CLIP, ~9.3 GiB in bf16) are loaded on the worker when a "
        "prompt first needs them; requests without a prompt never load them. keep: they stay loaded "
        "for the next prompt. unload: they are freed as soon as each prompt is encoded (before "
        "denoising), so a small GPU holds them only briefly; each prompted prediction then loads them "
        "again (seconds from a warm disk cache).",
    )
    device: str | None = Field(None, description="torch device; default cuda when present, else cpu.")
    fake_step_seconds: float = Field(
        0.0, ge=0, le=60, description="The fake model's time per denoising step (service tests, benchmarks)."
    )
    fake_cpu_seconds: float = Field(
        0.0,
        ge=0,
        le=60,
        description="The fake model's CPU time per prediction, after the model (safety check and encode "
        "stand-in), for tests and benchmarks of overlap.",
    )
    overlap: bool = Field(
        True,
        description="Run one prediction's safety check, encoding and storing (CPU) while the next one's "
        "model runs. false: one after the other (for comparison).",
    )
    cache_dir: Path = Field(
        default_factory=lambda: platformdirs.user_cache_path("fluxredux"),
        description="Where the demo model is written.",
    )
    max_image_bytes: int = Field(25 * 1024 * 1024, gt=0, description="Largest reference image file.")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Largest reference image, in pixels (decompression-bomb guard)."
    )
    safety_threshold: float = Field(
        0.5, ge=0, le=1, description="Detector score at or above which an explicit detection counts."
    )
    conditioning_cache_mb: int = Field(
        256,
        ge=0,
        description="Each worker keeps the Redux conditioning of recent reference images, on the "
        "model's device (GPU memory), up to this many MiB (the real model's is 5.7 MiB per image): a "
        "repeated reference skips the image encoder. 0 turns the cache off.",
    )

    # --- style adapters (LoRA; README: "Style adapters") --------------------------------
    lora_dir: Path | None = Field(
        None,
        description="Where the operator puts LoRA adapters (NAME.safetensors) that callers may "
        "name in `loras`. Default: DATA_DIR/loras. Workers and API nodes must see the same files.",
    )
    lora_sources: str = Field(
        "",
        max_length=2000,
        description="Hugging Face repos callers may name as LoRA adapters too, comma-separated: "
        "hf:owner/* (any repo of owner) or hf:owner/repo. Default: none (local adapters only). A "
        "worker downloads an allowed one on first use; callers' URLs are never fetched.",
    )
    lora_cache_count: int = Field(
        4, ge=1, le=64, description="LoRA adapters a worker keeps loaded at most (least recently used out)."
    )
    lora_cache_mb: int = Field(
        2048, ge=1, description="And the MiB of adapter weights it keeps loaded at most (files' sizes)."
    )
    lora_max_rank: int = Field(
        128,
        ge=1,
        le=1024,
        description="Largest LoRA rank accepted; with --compile, every adapter is padded to it so "
        "that a new one swaps in without recompiling (hotswap).",
    )

    # --- speed (the worker's model; see docs/performance.md) -----------------------------
    collapse_zero_tokens: bool = Field(
        True,
        description="Without a prompt, the 512 zero text tokens stay identical through every block: "
        "run them as one token whose key carries +ln(512) as an attention bias (exact; about 12% less "
        "work at 1 MP, 24% at 0.25 MP). Needs an attention backend that takes a bias. Off: the full "
        "512 tokens, as the reference implementation runs them.",
    )
    attention_backend: str = Field(
        "auto",
        min_length=1,
        max_length=64,
        description="The attention kernel, by diffusers' attention dispatcher name (native, "
        "_native_math, _native_efficient, _native_cudnn, _native_flash, flex, xformers, flash, "
        "_flash_3, sage...). auto: torch's scaled_dot_product_attention, which picks the kernel itself. "
        "Checked when the worker starts: unknown or unavailable is an error there.",
    )
    compile: CompileMode = Field(
        "none",
        description="torch.compile: none; transformer (the denoiser, where the time goes); all (also "
        "the VAE decoder and the image encoder). Compiled once at worker start over every graph a "
        "request can take (minutes for the real model; the compiled code is cached on disk under the "
        "data dir, so restarts are faster); no request recompiles afterwards. If compiling fails, the "
        "worker logs why and runs eager.",
    )
    quantize: Quantization = Field(
        "none",
        description="The transformer's weights. fp8: float8 linear layers (dynamic activations and "
        "weights, torchao), about twice the matmul throughput; needs a CUDA GPU of compute capability "
        "8.9 or newer (Ada, Hopper, Blackwell). int8: torchao int8 weight-only (any CUDA GPU, and CPUs): "
        "half bf16's memory. nf4: bitsandbytes 4-bit (CUDA): about a quarter. gguf: a GGUF checkpoint "
        "(transformer_file), dequantised layer by layer as it runs.",
    )

    # --- the server -------------------------------------------------------------------
    log_format: LogFormat = Field(
        "text",
        description="The log of the server and its workers. text: rich's on a terminal, else one "
        "line per record (time, level, server or worker, message), never wrapped. json: one JSON "
        "object per line (time, level, logger, message, process, pid), for log shippers.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    data_dir: Path = Field(
        default_factory=lambda: platformdirs.user_data_path("fluxredux"),
        description="Job database, uploaded inputs and outputs.",
    )
    storage: str | None = Field(
        None,
        description="Where uploaded inputs and outputs are kept: file:///shared/dir (a directory, "
        "e.g. a mount all machines share) or s3://bucket/prefix (an S3-compatible bucket; endpoint, "
        "region and credentials from the standard AWS variables). Default: the data dir's files folder.",
    )
    storage_timeout_seconds: float = Field(
        DEFAULT_STORAGE_TIMEOUT,
        gt=0,
        le=300,
        description="Object storage (S3): how long one try of a request waits to connect, and then for "
        "each read of its answer, before it counts as failed (bytes that keep coming keep it going).",
    )
    storage_attempts: int = Field(
        DEFAULT_STORAGE_ATTEMPTS,
        ge=1,
        le=10,
        description="Object storage (S3): tries of each request (the first and its retries, with a "
        "jittered backoff) before it fails: a 503 in a request, a retry by the worker.",
    )
    storage_outage_seconds: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="How long a worker rides out a storage outage for a prediction it holds (reading its "
        "reference image, writing the images it made), retrying with a growing pause while it keeps the "
        "job's lease, before failing it as storage_error. A full or read-only disk, a missing bucket or "
        "denied access fail at once (after one retry).",
    )
    redis_url: str | None = Field(
        None,
        description="Scale-out mode: redis://HOST:PORT/DB holds the queue, job state, limits, keys, "
        "shares, uploads, the worker registry and wake-ups, shared by every API node and worker. "
        "Default: none (one machine: SQLite in the data dir).",
    )
    redis_prefix: str = Field(
        "fluxredux:",
        min_length=1,
        max_length=64,
        description="Prefix of every Redis key: deployments sharing one Redis server keep apart by it.",
    )
    workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Worker processes `serve` starts on this machine (one per GPU). "
        "Default: 1 without redis_url, 0 with it (workers run as `fluxredux worker` anywhere).",
    )
    public_url: str | None = Field(
        None, description="Base URL for links in responses (default: the URL the request came to)."
    )
    rate_limit_per_minute: int = Field(60, ge=1, description="Prediction creations per key per minute.")
    read_limit_per_minute: int = Field(1200, ge=1, description="Polls, lists and uploads per key per minute.")
    max_in_flight_per_key: int = Field(10, ge=1, description="Queued + running predictions per key.")
    max_queue: int = Field(1000, ge=1, description="Queued predictions in all; over it: 503.")
    max_streams_per_key: int = Field(
        10, ge=1, description="Event streams a key may hold open on one API node; over it: 429."
    )
    max_streams: int = Field(
        500, ge=1, description="Event streams open on one API node in all; over it: 429."
    )
    max_body_bytes: int = Field(40 * 1024 * 1024, gt=0, description="Largest request body.")
    # uvicorn times out idle keep-alive connections only; these bound a slow (or stalled)
    # client, which otherwise holds its connection forever (see api/timeouts.py).
    header_timeout_seconds: float = Field(
        10.0, gt=0, le=3600, description="Time allowed to receive a request's line and headers."
    )
    body_timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="Time allowed to receive a request body (more for steady uploads)."
    )
    body_min_bytes_per_second: int = Field(
        64 * 1024,
        ge=0,
        description="Each this many body bytes received add a second to the body's time (0: no extension).",
    )
    metrics_access: MetricsAccess | Literal["auto"] = Field(
        "auto",
        description="/metrics: open (anyone), key (an API key, sent as for the API), off (404). "
        "auto: open when listening on loopback only without a public_url, else key.",
    )
    sync_wait_seconds: float = Field(60.0, gt=0, le=600, description="How long /run and ?wait= may hold.")
    retention_hours: float = Field(
        24 * 7, gt=0, description="Predictions, inputs and outputs are deleted after."
    )
    lease_seconds: float = Field(30.0, gt=0, description="A worker's lease on a running job.")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often a worker renews its lease.")
    max_attempts: int = Field(2, ge=1, description="Runs of a job whose worker was lost (2: re-run once).")
    worker_ttl_seconds: float = Field(
        15.0,
        gt=0,
        description="A worker not heard from for this long is gone: its job is re-run elsewhere.",
    )
    store_busy_timeout_seconds: float = Field(
        DEFAULT_BUSY_TIMEOUT,
        gt=0,
        le=60,
        description="How long a write waits for the job store's lock before giving up (a 503, retried).",
    )
    allow_private_urls: bool = Field(
        False, description="Let redux_image and webhook URLs reach private/loopback hosts (on-prem only)."
    )
    fetch_timeout_seconds: float = Field(20.0, gt=0, description="Time limit for fetching a redux_image URL.")
    webhook_secret: str | None = Field(
        None, description="Signs webhooks that carry no webhook_secret of their own."
    )
    replicate_model_alias: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$",
        description="Another owner/name under which the Replicate-compatible API serves the model "
        "(besides black-forest-labs/flux-redux-schnell), e.g. your-org/redux.",
    )
    webhook_attempts: int = Field(6, ge=1, description="Deliveries tried per webhook.")
    webhook_first_delay_seconds: float = Field(1.0, gt=0, description="Backoff before the 2nd try (doubles).")

    @property
    def metrics_policy(self) -> MetricsAccess:
        """``metrics_access`` with ``auto`` decided: open only on a loopback-only server that
        is not published (a public URL means a reverse proxy forwards the world to it)."""
        if self.metrics_access != "auto":
            return self.metrics_access
        return "open" if is_loopback(self.host) and not self.public_url else "key"

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_url_is_a_url(cls, value: object) -> object:
        # An empty FLUXREDUX_REDIS_URL= means "no Redis", not a URL to fail on later.
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str) and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must be redis://HOST:PORT/DB (or rediss://, unix://), not {value[:100]!r}")
        return value

    @model_validator(mode="after")
    def _someone_runs_the_jobs(self) -> Settings:
        # Without Redis, only this server's own workers can reach its queue: none would
        # accept predictions that never run.
        if self.workers == 0 and self.redis_url is None:
            raise ValueError(
                "workers=0 needs redis_url: without Redis no other worker can reach this server's jobs"
            )
        return self

    @model_validator(mode="after")
    def _heartbeats_fit_their_deadlines(self) -> Settings:
        # A lease or a registry entry must outlive a missed heartbeat or two, or a healthy
        # worker would lose its job to a second run.
        for deadline in ("lease_seconds", "worker_ttl_seconds"):
            if self.heartbeat_seconds * 2 > getattr(self, deadline):
                raise ValueError(
                    f"heartbeat_seconds ({self.heartbeat_seconds:g}) must be at most half of "
                    f"{deadline} ({getattr(self, deadline):g})"
                )
        return self

    @property
    def local_workers(self) -> int:
        """How many worker processes ``serve`` runs: ``workers``, or the mode's default."""
        if self.workers is not None:
            return self.workers
        return 0 if self.redis_url else 1

    @field_validator("lora_sources")
    @classmethod
    def _lora_sources_are_patterns(cls, value: str) -> str:
        for entry in _source_entries(value):
            if HUB_SOURCE.match(entry) is None:
                raise ValueError(f"{entry[:100]!r} is not hf:owner/* or hf:owner/repo")
        return value

    @property
    def lora_hub_sources(self) -> list[tuple[str, str]]:
        """(owner, repo or "*") for each entry of ``lora_sources``."""
        return [
            (m["owner"], m["repo"]) for m in map(HUB_SOURCE.match, _source_entries(self.lora_sources)) if m
        ]

    @property
    def loras_dir(self) -> Path:
        """``lora_dir``, or its default under the data dir."""
        return self.lora_dir if self.lora_dir is not None else self.data_dir / "loras"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "fluxredux.db"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"


def is_loopback(host: str) -> bool:
    """True when ``host`` can be reached from this machine only (127.x, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name (or "", all interfaces): assume reachable from outside
        return False


# Libraries whose INFO/WARNING chatter (HTTP requests, weight loading) hides what
# matters; shown with --verbose.
NOISY_LIBRARIES = ("httpx", "huggingface_hub", "diffusers", "transformers", "botocore", "boto3")


def quiet_libraries(verbose: bool) -> None:
    # transformers resets its logger's level when first imported; this variable is the
    # setting it reads then.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
