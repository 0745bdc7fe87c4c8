"""The daemon's configuration: a TOML file, every key overridable from the environment.

``EDGEVL_MODEL__PRECISION=int8`` overrides ``[model] precision``. Unknown keys
are errors, and every error names the file and the key.  Nothing is read at
import time: ``load_config`` is called by the commands that need it.

This module is a leaf: the settings, their defaults and the types of their
values; every other module may import it, it imports none of them (but errors).
Checking a configuration as a whole (its rules, secrets, folder layout) is
``edgevl.commands.check``.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edgevl.errors import ConfigError, format_validation_error

DEFAULT_CONFIG = Path("/etc/edgevl/edgevl.toml")
DEFAULT_MODEL = "Qwen/Qwen3-VL-2B-Instruct"
ENV_PREFIX = "EDGEVL_"  # EDGEVL_MODEL__PRECISION=int8 overrides [model] precision
Precision = Literal["float32", "bfloat16", "int8", "int4"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bfloat16", "int8", "int4")
# Whose weights a first start prepares under state_dir for the next (edgevl.engine.prepared); bfloat16 maps the
# checkpoint's own.
PREPARED: tuple[Precision, ...] = ("int8", "int4", "float32")
# The precisions built on int8 rows: int4 is int8's model with the language model's decoder layers in four-bit
# groups made from those rows (edgevl.engine.int4_kernel).
INT8_ROWS: tuple[Precision, ...] = ("int8", "int4")
Enforcement = Literal["auto", "cgroup", "rss"]
# What an image is resized to at most before encoding: 448x448 keeps a frame to
# a few seconds on two cores (the processor's own default is ~16 M pixels).
DEFAULT_MAX_PIXELS = 448 * 448


def default_device_id() -> str:
    return socket.gethostname()


def read_secret(path: Path, key: str) -> str:
    """A password or token file, refused when other users may read it (as ssh refuses such keys)."""
    try:
        with path.open(encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o007:
                raise ConfigError(f"{key}: {path} is open to other users (mode {mode & 0o777:04o}); "
                                  f"chmod o-rwx {path}")
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


# A path that "" (as in TOML or an environment override) turns off.
OptionalPath = Annotated[Path | None, BeforeValidator(lambda value: None if value in ("", None) else value)]


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(default=DEFAULT_MODEL, description="Hugging Face repo id (local cache only) or a model directory.")
    precision: Precision = Field(
        default="float32",
        description="float32 | bfloat16 | int8 | int4. int4 keeps the language model's layers in four-bit groups "
                    "(the rest as int8): faster decoding in less memory than int8; it builds a small C kernel at its "
                    "first start, so it needs a C compiler (cc).")
    threads: int = Field(default=0, ge=0, le=256, description="Compute threads; 0 = one per usable core.")
    max_batch: int = Field(default=0, ge=0, le=256, description="Answers decoded together; 0 = from the core count.")
    max_frames: int = Field(
        default=0, ge=0, le=64,
        description="Waiting images answered together, sharing the model's passes (the stream mode); 0 = from the "
                    "core count and memory_limit; 1 = each image alone.",
    )
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=3136, le=16_777_216,
        description="Pixels an image is resized to at most before encoding (rules may override).",
    )
    memory_limit: ByteSize = Field(default=ByteSize(10 << 30), description='Memory ceiling of the model, e.g. "10GiB".')
    memory_enforcement: Enforcement = Field(
        default="auto",
        description='How memory_limit is enforced on the worker: "cgroup" (the kernel\'s accounting; needs a '
                    'delegated cgroup), "rss" (the daemon samples and kills), "auto" (cgroup where possible).',
    )
    standby: bool = Field(
        default=True,
        description="Keep a standby beside the worker: a second process that has imported torch and the engine "
                    "(about 0.4 GB, under memory_limit) and takes over at once when the worker is lost, so that a "
                    "replacement starts at the weights. Left out where memory_limit has no room for it.",
    )
    stall_timeout: float = Field(
        default=0, ge=0, description="Seconds without model progress before it counts as hung; 0 = from the work."
    )
    load_timeout: float = Field(default=600, gt=0, description="Seconds the worker may take to load the model.")
    max_restarts: int = Field(
        default=5, ge=0, description="Worker replacements allowed within restart_window before the daemon exits."
    )
    restart_window: float = Field(default=60, gt=0, description="Seconds over which max_restarts is counted.")


class FolderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: Path = Field(
        default=Path("/var/lib/edgevl/results"), description="Result records go to <results>/<rule>/."
    )
    archive: OptionalPath = Field(
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


class FolderRetention(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_age_days: float = Field(
        default=0, ge=0, description="Files older than this many days are deleted; 0 keeps them whatever their age.")
    max_size: ByteSize = Field(
        default=ByteSize(0), ge=0,
        description='The folder holds at most this much, e.g. "20GiB"; the oldest files go first; 0: no limit.')


class RetentionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    archive: FolderRetention = Field(default_factory=FolderRetention, description="folders.archive: the images.")
    results: FolderRetention = Field(default_factory=FolderRetention, description="folders.results: the records.")
    failed: FolderRetention = Field(default_factory=FolderRetention,
                                    description="folders.failed: failed images and their error records.")
    min_free: ByteSize = Field(
        default=ByteSize(0), ge=0,
        description='Below this free space on the archive\'s filesystem the oldest archived images are deleted, '
                    'e.g. "2GiB"; 0: off.')
    interval: float = Field(default=300, gt=0, description="Seconds between sweeps.")


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Messages below this level are not logged (edgevl --log-level overrides it).")


class DaemonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stop_timeout: float = Field(
        default=60, gt=0, description="On SIGTERM, seconds to finish the current image before stopping anyway."
    )
    status_interval: float = Field(default=10, gt=0, description="Seconds between status updates.")


class MqttSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="", description='Broker host name or address; "" turns MQTT off.')
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS).")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description='MQTT protocol version: "5" or "3.1.1".')
    client_id: str = Field(default="", max_length=128, description="Client id; default edgevl-<device_id>.")
    username: str = Field(default="", description="User name; empty: no authentication.")
    password_file: OptionalPath = Field(
        default=None,
        description="File holding the password; default $CREDENTIALS_DIRECTORY/mqtt-password when it exists "
                    "(systemd LoadCredential=).",
    )
    tls: bool = Field(default=False, description="Connect over TLS.")
    ca_file: OptionalPath = Field(default=None, description="CA certificate(s) of the broker; default: the system's.")
    cert_file: OptionalPath = Field(default=None, description="Client certificate, for brokers that require one.")
    key_file: OptionalPath = Field(default=None, description="Private key of cert_file.")
    topic_prefix: str = Field(
        default="edgevl", min_length=1, pattern=r"^[^#+$\x00][^#+\x00]*$",
        description="Base topic of everything edgevl publishes: <topic_prefix>/<device_id>.",
    )
    qos: Literal[0, 1, 2] = Field(default=1, description="QoS of the input subscriptions and of the results.")
    max_payload: ByteSize = Field(default=ByteSize(20 << 20), description="Larger input messages are rejected.")
    share_group: str = Field(
        default="", pattern=r"^[^/#+\x00]*$",
        description="Non-empty: subscribe the inputs as $share/<group>/<topic>, so that appliances split the work.",
    )
    keepalive: int = Field(default=30, ge=5, le=65535, description="Seconds between keepalive pings.")
    session_expiry: int = Field(
        default=86400, ge=0,
        description="Seconds the broker keeps this client's session (and queues its input) while it is offline.",
    )
    reconnect_max: float = Field(default=60, ge=1, description="Longest wait between reconnection attempts.")
    status_interval: float = Field(default=30, gt=0, description="Seconds between retained status updates.")
    ha_discovery: bool = Field(default=False, description="Publish Home Assistant discovery for every question.")
    ha_prefix: str = Field(default="homeassistant", min_length=1, description="Home Assistant's discovery prefix.")

    @model_validator(mode="after")
    def _check(self) -> MqttSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.password_file is not None and not self.username:
            raise ValueError("password_file needs a username")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.host)


class HttpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str = Field(
        default="127.0.0.1:8080",
        description='host:port of the local HTTP API and commissioning page; "" turns it off. Binding beyond '
                    "loopback is the operator's explicit choice.",
    )
    token_file: OptionalPath = Field(
        default=None, description='File holding a token; when set, the API needs "Authorization: Bearer <token>".'
    )
    public_url: str = Field(
        default="", pattern=r"^(https?://\S+)?$",
        description="The page's address as others reach it (Home Assistant's link to the device), e.g. "
                    '"http://line3.local:8080/"; default: from listen, unless it listens on every address.')
    max_upload: ByteSize = Field(default=ByteSize(20 << 20), description="Larger requests are refused (413).")
    max_waiting: int = Field(
        default=4, ge=1, le=256, description="HTTP requests waiting for the model at once; more get 429."
    )
    request_timeout: float = Field(default=300, gt=0, description="Seconds a request waits for its answer (503).")
    recent_results: int = Field(default=200, ge=1, le=100_000, description="Records kept for GET /v1/results.")
    threads: int = Field(
        default=4, ge=1, le=64,
        description="Threads for requests that do not wait for the model; max_waiting + 1 more serve /v1/ask.",
    )
    max_connections: int = Field(
        default=500, ge=8, le=10_000, description="Open connections at most; idle and slow ones are closed first."
    )
    idle_timeout: float = Field(default=15, gt=0, description="Seconds an idle keep-alive connection stays open.")
    read_timeout: float = Field(
        default=60, gt=0, description="Seconds a client has to send a whole request, headers and body; slower "
                                      "clients are disconnected."
    )
    max_tokens: int = Field(
        default=256, ge=1, le=2048, description="Most tokens an ad-hoc question of /v1/ask may ask for."
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description="Host names the API answers to (the Host header); empty: loopback names and IP addresses, plus "
                    "the listen address. Refusing other names defeats DNS rebinding.",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError('listen is "host:port", e.g. "127.0.0.1:8080"')
        return value

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    def page_url(self) -> str | None:
        """The commissioning page's address for links to it, or None when it has none to give."""
        if self.public_url:
            return self.public_url
        if not self.listen:
            return None
        host, port = self.address
        if host in ("0.0.0.0", "::", ""):
            return None
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        token = read_secret(self.token_file, "http.token_file").strip()
        if not token:
            raise ConfigError(f"http.token_file: {self.token_file} is empty")
        return token


class Config(BaseSettings):
    """edgevl.toml"""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    device_id: str = Field(default_factory=default_device_id, min_length=1, max_length=128,
                           pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                           description="Name of this appliance in records and MQTT topics; default: the host name.")
    rules: Path = Field(
        default=Path("/etc/edgevl/rules.toml"), description="The rules file; relative to the configuration's folder."
    )
    state_dir: Path = Field(default=Path("/var/lib/edgevl"), description="Spool and other durable state.")
    model: ModelSettings = Field(default_factory=ModelSettings, description="The model.")
    folders: FolderSettings = Field(default_factory=FolderSettings, description="Folder inputs and outputs.")
    retention: RetentionSettings = Field(
        default_factory=RetentionSettings,
        description="How long the output folders keep their files. Never touches the spool or the MQTT outbox.")
    daemon: DaemonSettings = Field(default_factory=DaemonSettings, description="Process behaviour.")
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="MQTT inputs and outputs.")
    http: HttpSettings = Field(default_factory=HttpSettings, description="Local HTTP API and commissioning page.")

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
        text = path.read_text(encoding="utf-8") if path.exists() or path != DEFAULT_CONFIG else ""
        raw = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = Config(**raw)
    except ValidationError as exc:
        # Values from the environment are named by their variable, not as keys of the file.
        env = {tuple(k[len(ENV_PREFIX):].lower().split("__")): k for k in os.environ if k.startswith(ENV_PREFIX)}
        raise ConfigError("\n".join(format_validation_error(path, exc, raw, Config, text, env))) from None
    if not config.rules.is_absolute():
        config.rules = path.parent / config.rules
    return config
