"""Every setting in one place: command-line flags and ``OPTIM_*`` environment variables."""

from __future__ import annotations

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
    cache_bytes: int = Field(256 << 20, ge=0, description="local copy of hot sessions' state in front of sqlite/redis; 0 off")
    max_sessions: int = Field(100_000, ge=1, description="sessions the service holds at most")
    sweep_interval_seconds: float = Field(60.0, gt=0, description="how often expired sessions are reclaimed")
    idempotency_ttl_seconds: int = Field(24 * 3600, ge=1, description="how long a step's Idempotency-Key is remembered")
    cas_retries: int = Field(32, ge=1, description="reload-and-recompute attempts when another process wins a step")
    thread_offload_elements: int = Field(1 << 16, ge=0, description="updates this large run off the event loop")
    max_page_size: int = Field(1000, ge=1)
