"""The bridge's configuration: environment, a `.env` file, an optional TOML or YAML file.

Precedence, highest first: environment variables, `.env`, the config file
(`BRIDGE_CONFIG` or `llm-bridge run --config`), the defaults below.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from bridge.core import protocol as p

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_GRANT_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}/([A-Za-z0-9_\-]{1,64}|\*)$")
_TOOL_REF_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_config_file: ContextVar[Path | None] = ContextVar("bridge_config_file", default=None)


class Limits(BaseModel):
    """One device's limits; 0 (or an empty `models`) means no limit."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=list)
    max_tokens: int = Field(default=0, ge=0)
    max_request_bytes: int = Field(default=0, ge=0)
    requests_per_minute: int = Field(default=0, ge=0)
    tokens_per_day: int = Field(default=0, ge=0)
    max_streams: int = Field(default=0, ge=0)
    # protocol v2, "Tools": other owners' tools the device may use ("lamp/set_led",
    # "lamp/*", "bridge/get_time"; its own always), and the model calls per request.
    tools: list[str] = Field(default_factory=list)
    max_tool_rounds: int = Field(default=4, ge=1, le=32)

    @field_validator("tools")
    @classmethod
    def _grants(cls, v: list[str]) -> list[str]:
        for grant in v:
            if not _GRANT_RE.match(grant):
                raise ValueError(f"{grant[:80]!r} is not OWNER/TOOL or OWNER/* (OWNER a device id)")
        return v

    # Conversations kept by the bridge (bridge/plugins/sessions.py): these defaults fit a
    # small model's context (about 2000 tokens of history). 0 means no limit of this field.
    session_max_turns: int = Field(default=8, ge=0)
    session_max_chars: int = Field(default=8000, ge=0)
    session_ttl_s: int = Field(default=3600, ge=0)
    # Voice (docs/protocol.md "Voice"): what `"speak": true` means, how far audio
    # may run ahead of real time, and how much one utterance may hold.
    speak_format: Literal["pcm16", "wav", "mp3"] = "pcm16"
    speak_rate: Literal[8000, 16000, 22050, 24000] = 16000
    speak_voice: str = ""
    audio_lead_ms: int = Field(default=500, ge=20, le=60_000)
    audio_chunk_bytes: int = Field(default=3072, ge=256, le=65_536)
    listen_seconds: int = Field(default=30, ge=1, le=600)
    listen_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1024 * 1024)
    listen_timeout_ms: int = Field(default=3000, ge=100, le=60_000)
    # Pictures (docs/protocol.md "Pictures"): the camera topic filters the device may
    # name (none by default) and the largest upload it may send (0: BRIDGE_IMAGE_MAX_BYTES).
    camera_topics: list[str] = Field(default_factory=list)
    max_upload_bytes: int = Field(default=0, ge=0)

    @field_validator("camera_topics")
    @classmethod
    def _filters(cls, v: list[str]) -> list[str]:
        for f in v:
            levels = f.split("/")
            bad = not f or len(f) > 256 or "\x00" in f
            bad = bad or any(("+" in lv or "#" in lv) and len(lv) > 1 for lv in levels)
            if bad or "#" in levels[:-1]:
                raise ValueError(f"{f[:80]!r} is not an MQTT topic filter")
        return v


class PolicyConfig(BaseModel):
    """`policy.default` for every device; `policy.devices.<id>` overrides what it names."""

    model_config = ConfigDict(extra="forbid")

    default: Limits = Limits()
    devices: dict[str, Limits] = Field(default_factory=dict)

    @field_validator("devices")
    @classmethod
    def _device_ids(cls, v: dict[str, Limits]) -> dict[str, Limits]:
        for name in v:
            if not p.valid_device_id(name):
                raise ValueError(f"{name[:80]!r} is not a device id (1-64 of A-Z a-z 0-9 _ -)")
        return v

    def limits(self, device: str) -> Limits:
        """The limits that apply to `device`: its own fields over the default's."""
        own = self.devices.get(device)
        if own is None:
            return self.default
        merged = self.default.model_dump()
        merged.update(own.model_dump(exclude_unset=True))
        return Limits(**merged)

    @property
    def counts(self) -> bool:
        """Whether any limit needs the persistent counters."""
        return any(
            lim.requests_per_minute or lim.tokens_per_day
            for lim in (self.default, *self.devices.values())
        )


class ConfigError(Exception):
    """A configuration mistake, worded for the person who made it (one line, no secrets)."""


class MqttUrl(BaseModel):
    """Where the broker is, parsed from `mqtt://[user:pass@]host[:port]` or `mqtts://`."""

    tls: bool
    host: str
    port: int
    username: str | None = None
    password: SecretStr | None = None

    @classmethod
    def parse(cls, url: str) -> MqttUrl:
        """Parse a broker URL; raise ValueError with a message that never holds the password."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError("must start with mqtt:// or mqtts://")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("has a port that is not a number from 0 to 65535") from None
        if not parts.hostname:
            raise ValueError("has no host")
        if parts.path not in ("", "/"):
            raise ValueError("must not have a path")
        tls = parts.scheme == "mqtts"
        return cls(
            tls=tls,
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=SecretStr(unquote(parts.password)) if parts.password else None,
        )

    def display(self) -> str:
        """The URL without its password, for logs."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


class Settings(BaseSettings):
    """Everything the bridge reads at start; names are the environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    openai_base_url: str = Field(
        "https://api.openai.com/v1",
        validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url"),
    )
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    openai_model: str = Field(
        "gpt-4o-mini", validation_alias=AliasChoices("OPENAI_MODEL", "openai_model")
    )

    # Voice (docs/protocol.md "Voice"): the speech and transcription endpoints may
    # live elsewhere than chat; each unset one falls back to the chat API's.
    openai_audio_base_url: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_AUDIO_BASE_URL", "openai_audio_base_url")
    )
    openai_audio_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("OPENAI_AUDIO_API_KEY", "openai_audio_api_key")
    )
    openai_tts_model: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_TTS_MODEL", "openai_tts_model")
    )
    openai_tts_voice: str = Field(
        "alloy", validation_alias=AliasChoices("OPENAI_TTS_VOICE", "openai_tts_voice")
    )
    openai_stt_model: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_STT_MODEL", "openai_stt_model")
    )
    voice: bool = True
    # Pictures (docs/protocol.md "Pictures"): where images are generated (default: the
    # chat API), with which model and size; limits on every picture the bridge handles.
    openai_images_base_url: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_IMAGES_BASE_URL", "openai_images_base_url")
    )
    openai_images_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("OPENAI_IMAGES_API_KEY", "openai_images_api_key")
    )
    openai_image_model: str = Field(
        "gpt-image-1", validation_alias=AliasChoices("OPENAI_IMAGE_MODEL", "openai_image_model")
    )
    images: bool = True
    image_size: str = Field("1024x1024", pattern=r"^(auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4})$")
    image_max_side: int = Field(768, ge=16, le=4096)
    image_wait_ms: int = Field(2000, ge=0, le=600_000)
    image_max_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    image_max_pixels: int = Field(40_000_000, ge=1024, le=500_000_000)
    image_upload_timeout: float = Field(30.0, gt=0)

    mqtt_url: str = "mqtt://localhost:1883"
    mqtt_ca_file: Path | None = None
    # `llm-bridge broker check` (compose's health check) logs in as its own user:
    # one logged in as the bridge's would replace the bridge's connection.
    check_mqtt_url: str | None = None
    mqtt_tls_insecure: bool = False
    mqtt_keepalive: int = Field(30, ge=5, le=65535)
    mqtt_version: Literal["5", "3.1.1"] = "5"
    # Empty: the user name of mqtt_url (`bridge`), which is the id Mosquitto with
    # broker/'s config gives the bridge whatever it sends (use_username_as_clientid).
    client_id: str = Field("", max_length=64)
    session_expiry: int = Field(86400, ge=0, le=0xFFFFFFFF)
    topic_prefix: str = "llm"
    response_qos: int = Field(1, ge=0, le=1)

    # Streams cost the bridge little (an HTTP connection and a few KB each): a
    # request that waits for a free one waits a whole reply, so the default is high.
    max_streams: int = Field(512, ge=1, le=100_000)
    max_queue: int = Field(256, ge=0, le=1_000_000)
    max_request_bytes: int = Field(262_144, ge=256, le=16 * 1024 * 1024)
    dedup_window: float = Field(600.0, ge=0)
    upstream_ca_file: Path | None = None
    upstream_connect_timeout: float = Field(10.0, gt=0)
    # Seconds an idle API connection is kept for the next request (httpx keeps 5):
    # a device that asks every half minute then skips a new TCP and TLS handshake.
    upstream_keepalive: float = Field(60.0, ge=0, le=3600)
    upstream_read_timeout: float = Field(60.0, gt=0)
    upstream_total_timeout: float = Field(600.0, gt=0)
    upstream_retries: int = Field(2, ge=0, le=10)
    upstream_retry_base: float = Field(0.5, ge=0)
    upstream_retry_max_wait: float = Field(30.0, ge=0)
    include_usage: bool = True
    shutdown_grace: float = Field(5.0, ge=0)
    journal: bool = True
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"

    # Integrations (docs/protocol.md "State" and "Home Assistant"): retained
    # per-device state, Home Assistant discovery, and the devices known ahead.
    state: bool = True
    state_max_devices: int = Field(1000, ge=1, le=1_000_000)
    ha_discovery: bool = True
    ha_prefix: str = "homeassistant"
    devices: str = ""

    # Tools (docs/protocol.md "Tools"): devices' tools over MQTT, and Python functions
    # the bridge runs itself ("package.module:function", comma-separated or a list).
    device_tools: bool = True
    tools: str = ""
    tool_timeout_ms: int = Field(5000, ge=100, le=600_000)
    # Conversations kept by the bridge (docs/protocol.md "Sessions"), in BRIDGE_DATA_DIR.
    sessions: bool = True
    session_store_bytes: int = Field(32 * 1024 * 1024, ge=4096)
    session_max_per_device: int = Field(16, ge=1, le=100_000)
    # Debugging and statistics (docs/configuration.md).
    capture_dir: Path | None = None
    capture_max_files: int = Field(200, ge=1, le=1_000_000)
    capture_max_bytes: int = Field(16 * 1024 * 1024, ge=4096)
    stats_window: int = Field(256, ge=8, le=100_000)
    models_topic: bool = True

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    # Per-device policy and provisioning (docs/configuration.md, bridge/plugins/policy.py,
    # bridge/ops/provision.py): the limits, where the counters live, the broker's files.
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    data_dir: Path = Path("data")
    broker_dir: Path = Path("broker")

    # Workers (docs/scaling.md): a group of bridges behind one MQTT shared
    # subscription, with their shared state in Redis (`redis://...`) or, for
    # workers on one host, SQLite in `data_dir` (empty `state_url`).
    group: str = ""
    state_url: str = ""
    leader_ttl: float = Field(10.0, ge=1.0, le=3600.0)
    # Replicas of one container (`docker compose up --scale bridge=N`) share one
    # environment: each takes a free worker slot i of this many and becomes
    # `<client id>-i` with the broker user `<user>-i` (slot 1: the names as given).
    worker_slots: int = Field(0, ge=0, le=1000)

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        if v and not _DEVICE_RE.match(v):
            raise ValueError("must be 1-64 of A-Z a-z 0-9 _ - (it names a shared subscription)")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("openai_base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("openai_audio_base_url")
    @classmethod
    def _audio_url(cls, v: str | None) -> str | None:
        if not v:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("openai_images_base_url")
    @classmethod
    def _images_url(cls, v: str | None) -> str | None:
        return None if v is None or not v.strip() else cls._base_url(v)

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, v: str) -> str:
        MqttUrl.parse(v)
        return v

    @field_validator("check_mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, v: str | None) -> str | None:
        if v:
            MqttUrl.parse(v)
        return v or None

    @model_validator(mode="after")
    def _client_id_from_user(self) -> Settings:
        if not self.client_id:
            self.client_id = self.mqtt.username or "llm-bridge"
        return self

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip("/")
        if not _PREFIX_RE.match(v):
            raise ValueError("must be topic levels of A-Z a-z 0-9 _ - separated by /")
        return v

    @field_validator("ha_prefix")
    @classmethod
    def _ha_prefix(cls, v: str) -> str:
        v = v.strip("/")
        if not _PREFIX_RE.match(v):
            raise ValueError("must be topic levels of A-Z a-z 0-9 _ - separated by /")
        return v

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            v = ",".join(str(d) for d in v)
        if isinstance(v, str):
            for name in filter(None, (d.strip() for d in v.split(","))):
                if not _DEVICE_RE.match(name):
                    raise ValueError(f"{name[:80]!r} is not a device id (1-64 of A-Z a-z 0-9 _ -)")
        return v

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            v = ",".join(str(t) for t in v)
        if isinstance(v, str):
            for ref in filter(None, (t.strip() for t in v.split(","))):
                if not _TOOL_REF_RE.match(ref):
                    raise ValueError(f"{ref[:80]!r} is not package.module:function")
        return v

    @property
    def tool_refs(self) -> list[str]:
        """`BRIDGE_TOOLS` as a list, in order, without duplicates."""
        return list(dict.fromkeys(t for t in (t.strip() for t in self.tools.split(",")) if t))

    @property
    def known_devices(self) -> list[str]:
        """`BRIDGE_DEVICES` (comma-separated) as a list, in order, without duplicates."""
        names = (d.strip() for d in self.devices.split(","))
        return list(dict.fromkeys(d for d in names if d))

    @property
    def mqtt(self) -> MqttUrl:
        """The parsed broker URL."""
        return MqttUrl.parse(self.mqtt_url)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, dotenv_settings]
        path = _config_file.get()
        if path is not None:
            if path.suffix.lower() == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return (*sources, file_secret_settings)


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = str(loc[0]) if loc else "?"
    field = Settings.model_fields.get(name)
    if field is not None:
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            return str(alias.choices[0])
        return f"BRIDGE_{name.upper()}"
    return name


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Read the settings, or raise ConfigError with one line that says what is wrong.

    Args:
        config_file: a TOML or YAML file; when None, `BRIDGE_CONFIG` names it, if set.
        **overrides: values that win over every source (used by the CLI and tests).
    """
    if config_file is None and os.environ.get("BRIDGE_CONFIG"):
        config_file = os.environ["BRIDGE_CONFIG"]
    path = Path(config_file) if config_file else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    token = _config_file.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{_field_name(first['loc'])}: {msg}{more}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    finally:
        _config_file.reset(token)
