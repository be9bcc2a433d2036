"""Every setting in one place: command-line flags and ``OPTIM_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPTIM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    store: str = Field("sqlite:///data/optim.db", description="memory | sqlite:///path | redis://host:port/db")
    workers: int = Field(1, ge=1)
    log_level: str = "info"

    session_ttl_seconds: int = Field(30 * 24 * 3600, ge=0, description="idle sessions expire after this; 0 never")
    cache_bytes: int = Field(256 << 20, ge=0, description="in front of sqlite/redis, hot sessions' state kept "
                             "decoded in this process (a local copy of it); 0 off. The memory store's warm "
                             "sessions are its records themselves, bounded by the store")
    max_sessions: int = Field(100_000, ge=1, description="sessions the service holds at most")
    sweep_interval_seconds: float = Field(60.0, gt=0, description="how often expired sessions are reclaimed")
    api_keys: str | None = Field(None, description="comma-separated; when set every /v1 call needs one")
    api_keys_file: Path | None = Field(None, description="one key per line (# comments allowed)")
    expose_docs: bool = Field(True, description="serve /docs and /openapi.json")
    cors_origins: str | None = Field(None, description="comma-separated origins browsers may call from")
    expose_metrics: bool = Field(True, description="serve /metrics (Prometheus text format)")
    expose_dashboard: bool = Field(True, description="serve /dashboard (its data comes from the API, with the "
                                   "caller's key)")
    rate_limit_per_second: float = Field(1000.0, ge=0, description="requests per API key; 0 off (only with keys)")
    rate_limit_burst: int = Field(2000, ge=1)
    max_sessions_per_key: int = Field(1000, ge=1)
    max_body_bytes: int = Field(256 << 20, ge=1024, description="counted while streaming; 413 beyond")
    max_elements_per_session: int = Field(1 << 28, ge=1, description="parameters per session (each tensor's size "
                                          "summed); SQLite also caps a session's state at 1 GB")
    max_tensors_per_session: int = Field(1024, ge=1)
    max_json_depth: int = Field(64, ge=4, description="nesting of arrays and objects in a JSON body")
    max_bytes_per_key: int = Field(16 << 30, ge=1, description="stored bytes (state and metadata) one API key "
                                   "may hold across its sessions")
    memory_store_max_bytes: int | None = Field(None, ge=1, description="bytes the memory store holds in all; "
                                               "default half this machine's memory")

    # limits on a connection, before any request reaches the app (api/connection.py)
    max_header_bytes: int = Field(32 << 10, ge=1024, description="request line and headers; 431 beyond")
    max_headers: int = Field(100, ge=8, description="header fields per request; 431 beyond")
    header_timeout_seconds: float = Field(10.0, gt=0, description="to receive a request's headers; 408 after")
    body_idle_timeout_seconds: float = Field(30.0, gt=0, description="between two pieces of a body; 408 after")
    max_connections: int = Field(1000, ge=1, description="open connections per process; 503 beyond")

    store_timeout_seconds: float = Field(5.0, gt=0, description="each store call, and a step's wait for its "
                                         "session's lock; 503 after")
    readyz_timeout_seconds: float = Field(1.0, gt=0, description="/readyz answers 503 when the store takes longer")
    redis_wait_replicas: int = Field(0, ge=0, description="a Redis write is acknowledged once this many replicas "
                                     "of its master have it (WAIT): a failover loses none; 503 when fewer confirm")

    rollback_snapshots: int = Field(0, ge=0, le=1000, description="snapshots of the last steps each session keeps "
                                    "for POST .../rollback, unless it says (rollback_snapshots at create); 0 off")
    shm: bool = Field(False, description="shared-memory regions (POST /v1/shm/regions): steps whose gradients and "
                      "answer pass through /dev/shm, for clients on this host; one worker process only")
    shm_dir: Path = Field(Path("/dev/shm"), description="where region keys name files")
    shm_regions_per_key: int = Field(64, ge=1, description="regions one API key may hold registered")
    history_steps: int = Field(10_000, ge=0, description="steps of history kept per session (older ones "
                               "downsampled to every 10th, as many again); 0 off")
    diagnosis_window: int = Field(50, ge=5, description="steps the diagnosis reads")
    diagnosis_min_steps: int = Field(10, ge=2, description="steps before a verdict other than not_enough_data")
    diagnosis_divergence_factor: float = Field(4.0, gt=1, description="smoothed loss over its best: diverging")
    diagnosis_oscillation_fraction: float = Field(0.6, gt=0, le=1, description="share of opposed updates: oscillating")
    diagnosis_slow_decrease: float = Field(1e-3, ge=0, description="relative loss decrease per window under which, "
                                           "with tiny updates, training is too_slow")
    diagnosis_slow_ratio: float = Field(1e-4, ge=0, description="median update-to-parameter ratio under which updates "
                                        "are tiny")
    diagnosis_patience: int = Field(20, ge=1, description="steps without improvement: plateau")
    idempotency_ttl_seconds: int = Field(24 * 3600, ge=1, description="how long a step's Idempotency-Key is remembered")
    cas_retries: int = Field(32, ge=1, description="reload-and-recompute attempts when another process wins a step")
    fused_kernels: bool = Field(True, description="numba kernels; false runs the numpy reference")
    in_place: bool = Field(True, description="update a memory-store session's own state when provably safe "
                           "(no reader holds it, no value can come out non-finite): fewer memory streams")
    in_place_min_bytes: int = Field(1 << 23, ge=0, description="sessions whose state is smaller step out of place: "
                                    "there the proof costs more than the memory it saves")
    # a hop to a worker thread costs ~0.1 ms; below ~0.5 ms of update, running inline is faster and
    # blocks the loop no longer than a couple of small steps would (bench: 64k elements, 0.12 ms
    # inline against 0.22 offloaded)
    thread_offload_elements: int = Field(1 << 19, ge=0, description="updates this large run off the event loop")

    def key_list(self) -> list[str]:
        """The configured API keys, from OPTIM_API_KEYS and OPTIM_API_KEYS_FILE together."""
        keys = [k.strip() for k in (self.api_keys or "").split(",")]
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                keys.append(line.split("#", 1)[0].strip())
        return [k for k in keys if k]
