"""The daemon's configuration: a TOML file, every key overridable from the environment.

``EDGEVL_MODEL__PRECISION=int8`` overrides ``[model] precision``. Unknown keys
are errors, and every error names the file and the key.  Nothing is read at
import time: ``load_config`` is called by the commands that need it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edgevl.engine.engine import DEFAULT_MAX_PIXELS
from edgevl.engine.loading import DEFAULT_MODEL, Precision
from edgevl.errors import ConfigError
from edgevl.records import default_device_id
from edgevl.rules import RulesFile, format_validation_error, load_rules

DEFAULT_CONFIG = Path("/etc/edgevl/edgevl.toml")


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(default=DEFAULT_MODEL, description="Hugging Face repo id (local cache only) or a model directory.")
    precision: Precision = Field(default="float32", description="float32 | bfloat16 | int8.")
    threads: int = Field(default=0, ge=0, le=256, description="Compute threads; 0 = one per usable core.")
    max_batch: int = Field(default=0, ge=0, le=256, description="Answers decoded together; 0 = from the core count.")
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=3136, le=16_777_216,
        description="Pixels an image is resized to at most before encoding (rules may override).",
    )
    memory_limit: ByteSize = Field(default=ByteSize(10 << 30), description='Memory ceiling of the model, e.g. "10GiB".')
    stall_timeout: float = Field(
        default=0, ge=0, description="Seconds without model progress before it counts as hung; 0 = from the work."
    )


class FolderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: Path = Field(
        default=Path("/var/lib/edgevl/results"), description="Result records go to <results>/<rule>/."
    )
    archive: Path | None = Field(
        default=Path("/var/lib/edgevl/archive"),
        description='Processed images go to <archive>/<rule>/; "" deletes them instead.',
    )
    failed: Path = Field(default=Path("/var/lib/edgevl/failed"), description="Failed images and their error records.")
    poll_interval: float = Field(
        default=0, ge=0, description="> 0: poll the folders every so many seconds instead of inotify (network shares)."
    )
    settle_ms: int = Field(
        default=500, ge=0, description="A file is taken once its size and mtime are unchanged so long."
    )
    rescan_interval: float = Field(
        default=30, gt=0, description="Seconds between full rescans that catch events the watcher missed."
    )

    @field_validator("archive", mode="before")
    @classmethod
    def _empty_means_delete(cls, value: Any) -> Any:
        return None if value in ("", None) else value


class DaemonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stop_timeout: float = Field(
        default=60, gt=0, description="On SIGTERM, seconds to finish the current image before stopping anyway."
    )
    status_interval: float = Field(default=10, gt=0, description="Seconds between status updates.")


class Config(BaseSettings):
    """edgevl.toml"""

    model_config = SettingsConfigDict(
        env_prefix="EDGEVL_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    device_id: str = Field(default_factory=default_device_id, min_length=1, max_length=128,
                           pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Name of this appliance in records.")
    rules: Path = Field(
        default=Path("/etc/edgevl/rules.toml"), description="The rules file; relative to the configuration's folder."
    )
    state_dir: Path = Field(default=Path("/var/lib/edgevl"), description="Spool and other durable state.")
    model: ModelSettings = Field(default_factory=ModelSettings, description="The model.")
    folders: FolderSettings = Field(default_factory=FolderSettings, description="Folder inputs and outputs.")
    daemon: DaemonSettings = Field(default_factory=DaemonSettings, description="Process behaviour.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values come in as init values; the environment overrides them.
        return env_settings, init_settings

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"


def load_config(path: Path) -> Config:
    """Read and validate the configuration; ``ConfigError`` names the file and key of every problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() or path != DEFAULT_CONFIG else {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = Config(**raw)
    except ValidationError as exc:
        lines = format_validation_error(path, exc)
        overridden = [k for k in os.environ if k.startswith("EDGEVL_")]
        if overridden:
            lines.append(f"(environment overrides in effect: {', '.join(sorted(overridden))})")
        raise ConfigError("\n".join(lines)) from None
    if not config.rules.is_absolute():
        config.rules = path.parent / config.rules
    return config


def load_daemon_rules(path: Path) -> RulesFile:
    """The rules file as the daemon needs it: valid, with at least one rule."""
    rules = load_rules(path)
    if not rules.rules:
        raise ConfigError(f"{path}: no [[rule]] defined")
    return rules


def check(path: Path) -> tuple[Config, RulesFile]:
    """Validate the configuration and its rules file, as ``edgevl check`` and ExecStartPre do."""
    config = load_config(path)
    return config, load_daemon_rules(config.rules)
