"""Runtime configuration of the API, the sweeper and the worker glue.

Everything comes from `LETHE_*` environment variables (or a `.env` file) through
pydantic-settings. Nothing is read at import: call `get_settings()` (cached) or build a
`Settings(...)` directly in tests. Outside development the settings refuse to load with a
placeholder webhook signing secret, so a production deployment cannot sign callbacks with a
key everyone knows.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SIGNING_SECRET = "dev-insecure-webhook-secret"
_PLACEHOLDERS = {"", DEV_SIGNING_SECRET, "changeme", "change-me", "secret", "placeholder"}


def _var_dir() -> Path:
    return Path("var")


class Settings(BaseSettings):
    """All knobs of a Lethe deployment; defaults describe the embedded deployment."""

    model_config = SettingsConfigDict(env_prefix="LETHE_", env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = "development"
    var_dir: Path = Field(default_factory=_var_dir)
    database_url: str = ""
    broker_url: str = ""
    store_root: Path | None = None

    # Job lifecycle.
    heartbeat_timeout_s: float = 120.0
    queued_grace_s: float = 30.0
    sweeper_interval_s: float = 10.0
    max_attempts: int = 5

    # Reference statistics (DESIGN.md §2a): a `reference` job of K trainings is scheduled when
    # a model's version 1 is registered (`LETHE_REFERENCES=off` schedules none).
    references: bool = True
    reference_k: int = Field(default=8, ge=2)

    # Callbacks (signed webhooks).
    webhook_signing_secret: SecretStr = SecretStr(DEV_SIGNING_SECRET)
    callback_interval_s: float = 2.0
    callback_timeout_s: float = 10.0
    callback_max_age_s: float = 24 * 3600.0

    # Receipts: the Ed25519 private key (PKCS#8 PEM) that signs them. Required outside
    # development; in development a key is generated on first use under `var_dir`.
    receipt_signing_key_file: Path | None = None

    # OpenDSR processor interface (`/opendsr/v2`): the processor's PEM private key (RSA or EC)
    # and its X.509 certificate (required outside development; development generates a
    # self-signed pair under `var_dir` and says so), the domain they are issued to, the
    # identity types whose raw value is a subject ID, and the completion time promised.
    opendsr_key_file: Path | None = None
    opendsr_certificate_file: Path | None = None
    opendsr_domain: str = "localhost"
    opendsr_subject_identity_types: list[str] = Field(default_factory=lambda: ["controller_customer_id"])
    opendsr_expected_completion_days: float = Field(default=7.0, gt=0)

    # Limits.
    max_ids_per_request: int = 100_000
    max_body_bytes: int = 32 * 1024 * 1024  # 100,000 IDs of up to 200 characters
    max_checkpoint_bytes: int = 2 * 1024 * 1024 * 1024
    idempotency_ttl_s: float = 24 * 3600.0
    page_limit_default: int = 50
    page_limit_max: int = 1000

    # Background loops in the API process (tests switch them off).
    run_background_loops: bool = True

    @model_validator(mode="after")
    def _fill_defaults_and_fail_closed(self) -> Settings:
        var = self.var_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{(var / 'lethe.db').as_posix()}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{(var / 'broker.db').as_posix()}"
        if self.store_root is None:
            self.store_root = var / "models"
        if self.environment != "development":
            if self.webhook_signing_secret.get_secret_value().strip().lower() in _PLACEHOLDERS:
                raise ValueError(
                    "LETHE_WEBHOOK_SIGNING_SECRET must be set to a real secret outside development"
                )
            if len(self.webhook_signing_secret.get_secret_value()) < 32:
                raise ValueError("LETHE_WEBHOOK_SIGNING_SECRET must be at least 32 characters")
        return self

    @property
    def store_path(self) -> Path:
        """The model store's root directory (always set after validation)."""
        assert self.store_root is not None
        return self.store_root

    @property
    def is_sqlite(self) -> bool:
        """True for the embedded SQLite database."""
        return self.database_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first call."""
    return Settings()
