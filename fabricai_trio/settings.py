"""Server settings, read from the environment and `.env`.

Every setting is one field here; `docs/configuration.md` is generated from this class
(`scripts/gen-config-docs`, which runs `python -m fabricai_trio.settings --write-docs` and
also writes `.env.example`), and a test fails when they disagree.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["text", "json"]
StoreBackend = Literal["memory", "redis", "sql"]
AuthMode = Literal["auto", "off"]
#: Shortest HMAC secret accepted (JWT_SECRET, OWNER_ID_SECRET), in bytes (RFC 7518 §3.2).
MIN_SECRET_BYTES = 32


class ConfigError(Exception):
    """A setting has an invalid value; the message names the variable, on one line."""


class Settings(BaseSettings):
    """Typed configuration; units are in the names (seconds, bytes, ms)."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- model and engine ---
    llm_model: Path | None = Field(
        None,
        description="Serve this one model (a shorthand for MODELS): a path to a .gguf model, "
        "or an embedded model's name: `gemma3` (Gemma 3 270M, a base model) or `smollm2` "
        "(SmolLM2 135M Instruct); docs/models.md. Unset: the models of MODELS.",
    )
    models: str = Field(
        "gemma3,smollm2",
        description="The models served when LLM_MODEL is unset: comma-separated entries, "
        "each `name=path` (a .gguf file, or an embedded model's name) or a bare embedded "
        "name (`gemma3`, `smollm2`). A request's `model` picks one by name; each gets its "
        "own engine, MAX_CONCURRENT_REQUESTS slots and MAX_QUEUE_SIZE queue (docs/models.md).",
    )
    default_model: str | None = Field(
        None,
        description="The model a request without `model` gets (one of MODELS). Unset: "
        "`smollm2` when it is served, else the first of MODELS. Ignored with LLM_MODEL.",
    )
    model_cache_dir: Path = Field(
        Path.home() / ".cache" / "fabricai-trio",
        description="Where the embedded Gemma model is assembled (once); an embedded model's "
        ".gguf found here is used as is.",
    )
    engine: str = Field(
        "batched",
        description="Engine backend: `batched` (continuous batching on one llama.cpp context, "
        "docs/performance-batching.md), `llama` (a pool of llama.cpp contexts, one per slot) "
        "or `module:Class`.",
    )
    n_ctx: int = Field(
        4096, ge=64, le=1_048_576,
        description="Context window of each generation (prompt, history and reply): every "
        "slot, and with ENGINE=batched every prefix-cache sequence, gets this much KV memory.",
    )
    n_threads: int = Field(
        max(1, os.cpu_count() or 1), ge=1, le=1024, description="CPU threads per decode."
    )
    tokenize_threads: int = Field(
        1, ge=1, le=64,
        description="Worker threads that tokenize prompts at once (a limiter of their own: "
        "decoding never waits for them). Prompts are tokenized in pieces of about 1 KB, so a "
        "long prompt waits its turn between pieces instead of holding a thread.",
    )
    constraint_warmup: bool = Field(
        True,
        description="Build each model's tokenizer for constrained decoding (llguidance's, "
        "over the model's vocabulary: about 1-2 s of CPU for Gemma's 262k tokens) in the "
        "background as soon as the model has loaded, so the first request with "
        "`response_format`, `grammar` or a forced tool call does not pay for it. Readiness "
        "does not wait for it: a constrained request that arrives while it is still running "
        "waits for the same build. Off: it is built at the first constrained request.",
    )
    n_batch: int = Field(
        512, ge=1, le=65_536,
        description="ENGINE=llama: prompt tokens evaluated per llama.cpp decode call (at most "
        "N_CTX). ENGINE=batched ignores it: see PREFILL_CHUNK_TOKENS.",
    )
    chat_format: str | None = Field(
        None,
        description="llama-cpp-python chat format for `messages` (e.g. `gemma`, `chatml`). "
        "Unset: the model's own Jinja template from its GGUF metadata; a model without one "
        "gets `gemma` (Gemma models, the embedded `gemma3` too) or `chatml` (docs/models.md).",
    )
    model_alias: str | None = Field(
        None,
        description="With LLM_MODEL: the model's name in the API. Unset: the embedded "
        "model's name or the file name. (MODELS entries are named by their `name`.)",
    )
    prefill_chunk_tokens: int = Field(
        48, ge=1, le=65_536,
        description="ENGINE=batched: tokens per step. Each decoding stream's token comes "
        "first, prompt chunks fill the rest (at least a quarter), so a long prompt is spread "
        "over steps and adds at most about one budget of work to the running streams' "
        "inter-token latency.",
    )
    flash_attn: bool = Field(
        True,
        description="ENGINE=batched: llama.cpp's flash attention (10-20% more tok/s with many "
        "streams). Off: the attention kernels of ENGINE=llama, whose tokens a lone stream then "
        "matches exactly. Always off with BATCH_INVARIANT.",
    )
    batch_invariant: bool = Field(
        False,
        description="ENGINE=batched: a sequence's tokens never depend on what else is in "
        "the batch (bit-identical to decoding it alone at temperature 0), at the cost of "
        "decoding a lone stream at about half speed.",
    )
    prefix_cache_sequences: int = Field(
        4, ge=0, le=128,
        description="ENGINE=batched: finished sequences whose KV cache is kept for prefix "
        "reuse (each costs N_CTX of KV memory); 0: off.",
    )

    # --- admission ---
    max_concurrent_requests: int = Field(
        2, ge=1, le=256,
        description="Generations that run at once: sequences decoded together in one llama.cpp "
        "context (ENGINE=batched), or llama.cpp contexts (ENGINE=llama); more wait in the one "
        "queue. Admission runs as many as the engine reports slots (the built-in engines: "
        "this number).",
    )
    max_queue_size: int = Field(
        16, ge=0, le=100_000, description="Requests that may wait for a slot; more get 429."
    )
    retry_after_seconds: int = Field(
        1, ge=0, le=3600, description="`Retry-After` sent with a 429."
    )
    queue_policy: Literal["fair", "fifo"] = Field(
        "fair",
        description="Order of the queue: `fair` serves identities (API key owner, JWT "
        "subject; anonymous is one) in turn, weighted by expected tokens, so one waits "
        "behind at most one request of each other; `fifo` serves arrivals in order (for "
        "a gateway in front that shares fairly itself). See docs/fairness.md.",
    )
    max_concurrent_per_key: int = Field(
        0, ge=0, le=256,
        description="Slots one identity may hold at once (a request with `n` choices "
        "holds n); its other requests wait in the queue. 0: no cap.",
    )
    max_choices: int = Field(
        8, ge=1, le=256,
        description="Largest `n` (choices of one prompt) an OpenAI request may ask for; "
        "more gets 400 `too_many_choices`. Each choice takes one of the model's slots, "
        "granted together, so `n` above MAX_CONCURRENT_REQUESTS (or MAX_CONCURRENT_PER_KEY) "
        "is refused the same way.",
    )
    max_queued_per_key: int = Field(
        0, ge=0, le=100_000,
        description="Requests one identity may have waiting; one more gets 429 "
        "`per_key_limit` while other identities still get in. 0: no cap (one identity "
        "may then fill MAX_QUEUE_SIZE).",
    )
    priority_classes: str = Field(
        "high,normal,low",
        description="Priority classes, highest first (comma-separated, 1-8 names of "
        "lowercase letters, digits, `_` and `-`). A key's class comes from API_KEYS_FILE "
        "(`priority=<class>`) or the JWT claim JWT_PRIORITY_CLAIM; higher classes are "
        "served first, within PRIORITY_STARVATION_LIMIT. One name: no classes. See "
        "docs/fairness.md.",
    )
    priority_default_class: str | None = Field(
        None,
        description="The class of a request whose identity names none (or names an unknown "
        "one in its JWT); one of PRIORITY_CLASSES. Unset: `normal` if it is one, else the "
        "lowest class.",
    )
    priority_starvation_limit: int = Field(
        4, ge=1, le=1_000_000,
        description="Admissions of higher priority classes a waiting lower class lets go "
        "first at most: between two slots given to a class whose next request could run, "
        "at most this many go to higher classes.",
    )
    rate_limit_requests_per_minute: int = Field(
        0, ge=0, le=1_000_000,
        description="Requests one identity may start per minute (a token bucket: bursts "
        "up to this); more get 429 `rate_limited`. Shared by every replica through "
        "REDIS_URL, else per process. 0: off.",
    )
    rate_limit_tokens_per_minute: int = Field(
        0, ge=0, le=1_000_000_000,
        description="Tokens one identity may use per minute: prompt + max_tokens is "
        "reserved when a request starts and what it did not generate is given back "
        "when it ends. 0: off.",
    )

    # --- limits ---
    max_tokens_limit: int = Field(
        2048, ge=1, le=1_048_576, description="Largest `max_tokens` a request may ask for."
    )
    default_max_tokens: int = Field(
        256, ge=1, le=1_048_576, description="`max_tokens` when a request does not say."
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, le=1 << 30, description="Largest request body; more gets 413."
    )

    # --- HTTP server ---
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65_535, description="TCP port (0: pick a free one).")
    sse_keepalive_seconds: float = Field(
        15.0, gt=0, le=3600, description="Interval of `: keepalive` comments while queued."
    )
    drain_timeout_seconds: float = Field(
        20.0, ge=0, le=3600,
        description="On SIGTERM/SIGINT: how long generations in flight may run to their end "
        "(new requests get 503 `draining`); what is left then ends with `finish_reason: "
        "cancelled`.",
    )
    shutdown_grace_seconds: float = Field(
        5.0, ge=0, le=3600,
        description="After the drain: how long connections may take to send their last "
        "bytes before they are closed.",
    )
    slow_client_timeout_seconds: float = Field(
        15.0, gt=0, le=3600,
        description="A client that has not taken what was sent to it for this long (it "
        "stopped reading: the bytes stay unwritten) loses its generation (`finish_reason: "
        "cancelled`, cause `slow_client`, turn stored) and its connection. Also the write "
        "deadline of every socket: a write that does not complete in this time closes "
        "the connection (docs/reliability.md).",
    )
    stream_buffer_bytes: int = Field(
        65_536, ge=1024, le=64 * 1024 * 1024,
        description="Bytes of events one HTTP stream (SSE, OpenAI) may have waiting to be "
        "written to its client; while full, its generation waits (at most "
        "SLOW_CLIENT_TIMEOUT_SECONDS). A frame counts until it is written.",
    )
    keep_alive_seconds: float = Field(
        5.0, gt=0, le=3600, description="An idle keep-alive HTTP connection is closed after "
        "this long.",
    )
    max_connections: int = Field(
        1000, ge=1, le=1_000_000,
        description="Open TCP connections the server serves at once; more are closed as "
        "soon as they are accepted.",
    )
    fast_refusals: bool = Field(
        True,
        description="While a model's queue is full, answer the generation requests it would "
        "refuse (429 `queue_full`, `per_key_limit`) before the web framework runs: the same "
        "answer, at a fraction of the cost (docs/performance.md, Refusals). `false`: every "
        "request goes through the framework (to compare).",
    )
    raw_refusals: bool = Field(
        True,
        description="With FAST_REFUSALS: answer those refusals at the connection layer, "
        "from a request's raw bytes, before the HTTP server parses it, when the request "
        "is one complete simple HTTP/1.1 request on an idle keep-alive connection "
        "(anything else goes to the HTTP server as before): the same answer, cheaper "
        "still (docs/performance.md, Refusals). `false`: the fast path over ASGI only.",
    )
    resume_ttl_seconds: int = Field(
        600, ge=1, le=86_400,
        description="How long a stream's end (and a resumable stream's events) is kept for "
        "a reconnect with `Last-Event-ID`.",
    )
    resume_max_events: int = Field(
        8192, ge=16, le=1_000_000,
        description="Most events kept per resumable stream (older ones are dropped).",
    )
    resume_grace_max_seconds: float = Field(
        120.0, ge=0, le=3600,
        description="Largest `resume_grace_seconds` a request may ask for: how long a "
        "resumable generation keeps going while no client is connected.",
    )
    log_level: LogLevel = Field("INFO", description="Log level.")

    # --- sessions ---
    session_store: StoreBackend | None = Field(
        None,
        description="`memory`, `redis` or `sql`. Unset: `redis` when REDIS_URL is set, "
        "else `memory`.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL, e.g. `redis://localhost:6379/0`: sessions (see SESSION_STORE), "
        "Socket.IO rooms across replicas, and cancels forwarded to the replica running the "
        "generation.",
    )
    redis_prefix: str = Field(
        "fabricai:", description="Prefix of every Redis key and pub/sub channel."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL for SESSION_STORE=sql (SQLite or PostgreSQL)."
    )
    session_ttl_seconds: int = Field(
        86_400, ge=1, description="A session expires this long after its last write."
    )
    session_autocreate: bool = Field(
        False, description="Create an unknown `session_id` on first use instead of 404."
    )
    session_lock_seconds: float = Field(
        600.0, gt=0, description="Expiry of a session's generation lock (crash safety)."
    )
    store_timeout_seconds: float = Field(
        2.0, gt=0, le=600, description="Timeout of one session store call."
    )
    session_max_per_owner: int = Field(
        100, ge=1,
        description="Live sessions one identity may keep; creating one more is a 429 "
        "`too_many_sessions`. With auth off every client is `anonymous`: one cap for all.",
    )
    session_max_bytes: int = Field(
        1_048_576, ge=1024,
        description="UTF-8 bytes of message content one session may hold. A request that "
        "would pass it is a 413 `session_too_large` before anything runs; the reply of a "
        "generation let in is always stored, so a session holds at most this plus one reply.",
    )
    memory_store_max_bytes: int = Field(
        268_435_456, ge=65_536,
        description="SESSION_STORE=memory only: bytes of message content (plus 1 KiB per "
        "session) the whole store may hold; past it, a 429 `session_store_full`.",
    )

    # --- Socket.IO ---
    socketio_ping_interval_ms: int = Field(25_000, ge=10, description="Engine.IO ping interval.")
    socketio_ping_timeout_ms: int = Field(20_000, ge=10, description="Engine.IO ping timeout.")
    socketio_max_payload: int = Field(
        1_000_000, ge=1024, description="Largest Engine.IO payload in bytes."
    )
    socketio_connect_timeout_ms: int = Field(
        45_000, ge=10, description="Time a client has to CONNECT after the handshake."
    )
    socketio_max_inflight_events: int = Field(
        100, ge=1, le=100_000,
        description="Socket.IO events one connection may have in flight (handlers not yet "
        "done); more are refused at once with an `inference_error` / error ack "
        "(`too_many_events`).",
    )
    socketio_max_inflight_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=1 << 30,
        description="Bytes of Socket.IO events one connection may have in flight (received "
        "and not yet handled); more are refused like SOCKETIO_MAX_INFLIGHT_EVENTS.",
    )
    socketio_max_packets_per_post: int = Field(
        1000, ge=16, le=1_000_000,
        description="Engine.IO packets one polling POST may carry; more: 400 and the "
        "session closes.",
    )
    socketio_max_sessions: int = Field(
        10_000, ge=1, le=1_000_000,
        description="Engine.IO sessions open at once; a handshake beyond it gets 503.",
    )
    socketio_max_unconnected: int = Field(
        1000, ge=1, le=1_000_000,
        description="Engine.IO sessions that have not yet connected to a Socket.IO "
        "namespace; a session beyond it is closed at once.",
    )
    socketio_cors_origins: str = Field(
        "",
        description="Comma-separated origins allowed for Socket.IO (`*`: any). Empty: "
        "same-origin only.",
    )

    # --- authentication (docs/auth.md); any of these set: every route but /health, the
    # playground's files and (with METRICS_REQUIRE_AUTH=false) /metrics needs it ---
    auth_mode: AuthMode = Field(
        "auto",
        description="`auto`: authentication is on when API_KEYS, API_KEYS_FILE, JWT_SECRET or "
        "JWT_PUBLIC_KEY is set (one that is set must hold a credential, else start-up "
        "fails), and a server without any may only listen on a loopback HOST. `off`: serve "
        "everyone as `anonymous` on any HOST (an explicit choice; none of those may be set).",
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys accepted as `Bearer` or `X-Api-Key`."
    )
    api_keys_file: Path | None = Field(
        None, description="File of API keys, one per line (`#` comments allowed), each "
        "optionally followed by `priority=<class>` (one of PRIORITY_CLASSES)."
    )
    owner_id_secret: SecretStr | None = Field(
        None,
        description="HMAC secret (32 bytes or more) that turns an API key into its owner id "
        "`key:<hmac>`. Unset: a random one per process, so API-key sessions are not found "
        "after a restart; required with API keys and a shared store (redis, sql).",
    )
    jwt_secret: SecretStr | None = Field(
        None,
        description="Accept HS256 JWTs signed with this secret (32 bytes or more); the owner "
        "is `jwt:<iss>:<sub>`.",
    )
    jwt_public_key: str | None = Field(
        None, description="Accept RS256 JWTs: a PEM public key, or the path of one."
    )
    jwt_audience: str | None = Field(None, description="Required JWT `aud` claim.")
    jwt_issuer: str | None = Field(None, description="Required JWT `iss` claim.")
    jwt_require_exp: bool = Field(True, description="A JWT without `exp` is refused.")
    jwt_leeway_seconds: float = Field(
        10.0, ge=0, le=300, description="Clock skew allowed on a JWT's `exp`, `nbf` and `iat`."
    )
    jwt_priority_claim: str | None = Field(
        None,
        description="JWT claim naming the token's priority class (one of PRIORITY_CLASSES; "
        "missing, not a string or unknown: PRIORITY_DEFAULT_CLASS). Unset: JWTs get the "
        "default class.",
    )
    auth_failure_limit: int = Field(
        20, ge=0, le=1_000_000,
        description="Failed authentications a client address may make per "
        "AUTH_FAILURE_WINDOW_SECONDS; past that its attempts get 429 (Socket.IO: a refused "
        "CONNECT) without being checked. 0: no limit.",
    )
    auth_failure_window_seconds: float = Field(
        60.0, gt=0, le=86_400, description="The window of AUTH_FAILURE_LIMIT."
    )
    allowed_hosts: str = Field(
        "",
        description="Comma-separated `Host` names requests may carry (`*`: any; "
        "`*.example.com`: its subdomains); others get 400, probes excepted. Empty: any with "
        "authentication on, else `localhost`, `*.localhost` and loopback addresses.",
    )
    metrics_require_auth: bool = Field(
        True, description="`GET /metrics` needs credentials too (when auth is on)."
    )

    # --- logging ---
    log_format: LogFormat = Field(
        "text", description="`text`, or `json`: one JSON object per log line."
    )
    log_prompts: bool = Field(
        False, description="Put prompt text in the request log lines (off: never logged)."
    )
    refusal_log_seconds: float = Field(
        10.0, ge=0, le=3600,
        description="429 answers are logged in aggregate: the first after a quiet spell gets "
        "its request line, those that follow within this many seconds are counted (their "
        "lines at DEBUG) and logged as one line. 0: one INFO line each, like other requests.",
    )

    @field_validator("llm_model", "chat_format", "model_alias", "default_model", mode="before")
    @classmethod
    def _empty_model_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("models")
    @classmethod
    def _models_parse(cls, value: str) -> str:
        parse_models(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("priority_classes")
    @classmethod
    def _priority_classes_parse(cls, value: str) -> str:
        parse_priority_classes(value)
        return value

    @field_validator("priority_default_class", "jwt_priority_claim", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("jwt_public_key")
    @classmethod
    def _public_key_pem_or_file(cls, value: str | None) -> str | None:
        if value and not value.lstrip().startswith("-----BEGIN") and not Path(value).is_file():
            raise ValueError("must be a PEM public key or the path of a PEM file")
        return value or None

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.jwt_secret is not None and self.jwt_public_key is not None:
            raise ValueError("set JWT_SECRET (HS256) or JWT_PUBLIC_KEY (RS256), not both")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("DEFAULT_MAX_TOKENS must not exceed MAX_TOKENS_LIMIT")
        if self.resolved_session_store == "redis" and not self.redis_url:
            raise ValueError("REDIS_URL is required when SESSION_STORE=redis")
        if self.resolved_session_store == "sql" and not self.database_url:
            raise ValueError("DATABASE_URL is required when SESSION_STORE=sql")
        if self.llm_model is None and self.default_model is not None:
            names = parse_models(self.models)
            if self.default_model not in names:
                raise ValueError(f"DEFAULT_MODEL: {self.default_model!r} is not one of MODELS "
                                 f"({', '.join(names)})")
        self._check_priorities()
        self._check_auth()
        return self

    def _check_priorities(self) -> None:
        """Class names are a bounded set (they are metric labels); the default class
        and every class the keys file names must be one of them."""
        names = self.priority_class_names
        if self.priority_default_class is not None and self.priority_default_class not in names:
            raise ValueError(f"PRIORITY_DEFAULT_CLASS: {self.priority_default_class!r} is not "
                             f"one of PRIORITY_CLASSES ({', '.join(names)})")
        for key_class in self.file_api_key_classes().values():
            if key_class not in names:
                raise ValueError(f"API_KEYS_FILE names the priority class {key_class!r}, which "
                                 f"is not one of PRIORITY_CLASSES ({', '.join(names)})")

    def _check_auth(self) -> None:
        """Fail closed: a credential setting that is set must hold a credential, and
        serving without authentication is a choice (loopback, or AUTH_MODE=off)."""
        for name, secret in (("JWT_SECRET", self.jwt_secret),
                             ("OWNER_ID_SECRET", self.owner_id_secret)):
            if secret is not None and len(secret.get_secret_value().encode()) < MIN_SECRET_BYTES:
                raise ValueError(f"{name} must be at least {MIN_SECRET_BYTES} bytes")
        if self.api_keys is not None and not split_keys(self.api_keys.get_secret_value()):
            raise ValueError("API_KEYS is set but holds no key")
        if self.api_keys_file is not None and not self.file_api_keys():
            raise ValueError(f"API_KEYS_FILE {self.api_keys_file} holds no key")
        configured = [name for name, value in (
            ("API_KEYS", self.api_keys), ("API_KEYS_FILE", self.api_keys_file),
            ("JWT_SECRET", self.jwt_secret), ("JWT_PUBLIC_KEY", self.jwt_public_key),
        ) if value is not None]
        if self.auth_mode == "off" and configured:
            raise ValueError(f"AUTH_MODE=off but {', '.join(configured)} set: choose one")
        if self.auth_mode == "auto" and not configured and not is_loopback(self.host):
            raise ValueError(
                f"HOST={self.host} is not a loopback address and no API_KEYS, API_KEYS_FILE, "
                "JWT_SECRET or JWT_PUBLIC_KEY is set: set one, or AUTH_MODE=off to serve "
                "anyone without authentication"
            )
        has_keys = self.api_keys is not None or self.api_keys_file is not None
        if has_keys and self.owner_id_secret is None and self.resolved_session_store != "memory":
            raise ValueError(
                "OWNER_ID_SECRET is required with API keys and SESSION_STORE="
                f"{self.resolved_session_store}: owner ids must agree across restarts and "
                "replicas"
            )
        limited = self.rate_limit_requests_per_minute or self.rate_limit_tokens_per_minute
        if has_keys and self.owner_id_secret is None and self.redis_url and limited:
            raise ValueError(
                "OWNER_ID_SECRET is required with API keys and rate limits kept in Redis: "
                "a key's owner id (its rate-limit bucket) must agree across replicas"
            )

    def file_api_keys(self) -> list[str]:
        """The keys of API_KEYS_FILE (blank lines and `#` comments skipped)."""
        return [key for key, _ in self._file_entries()]

    def file_api_key_classes(self) -> dict[str, str]:
        """Key → priority class, for the keys of API_KEYS_FILE that name one."""
        return {key: key_class for key, key_class in self._file_entries()
                if key_class is not None}

    def _file_entries(self) -> list[tuple[str, str | None]]:
        if self.api_keys_file is None:
            return []
        try:
            text = self.api_keys_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"API_KEYS_FILE: {exc}") from None
        return parse_keys_file(text)

    @property
    def priority_class_names(self) -> list[str]:
        """PRIORITY_CLASSES as a list, highest first."""
        return parse_priority_classes(self.priority_classes)

    @property
    def resolved_priority_default_class(self) -> str:
        """PRIORITY_DEFAULT_CLASS, else `normal` if it is a class, else the lowest."""
        names = self.priority_class_names
        if self.priority_default_class is not None:
            return self.priority_default_class
        return "normal" if "normal" in names else names[-1]

    def configured_api_keys(self) -> list[str]:
        """Every API key of API_KEYS and API_KEYS_FILE."""
        keys = split_keys(self.api_keys.get_secret_value()) if self.api_keys else []
        return keys + self.file_api_keys()

    @property
    def auth_configured(self) -> bool:
        """Whether any credential setting is set (then authentication is on)."""
        return any(value is not None for value in (
            self.api_keys, self.api_keys_file, self.jwt_secret, self.jwt_public_key))

    @property
    def allowed_host_patterns(self) -> list[str]:
        """ALLOWED_HOSTS as a list; empty means the automatic choice (see the field)."""
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]

    def served_models(self) -> dict[str, Settings]:
        """MODELS as name → that model's settings (`llm_model` and `model_alias` set),
        the default model first. Empty with LLM_MODEL: then these settings serve the
        one model, named as its engine names it."""
        if self.llm_model is not None:
            return {}
        names = parse_models(self.models)
        default = self.resolved_default_model
        order = [default, *(n for n in names if n != default)]
        return {
            name: self.model_copy(update={"llm_model": names[name], "model_alias": name})
            for name in order
        }

    @property
    def resolved_default_model(self) -> str:
        """The default of MODELS (meaningless with LLM_MODEL)."""
        names = parse_models(self.models)
        if self.default_model is not None:
            return self.default_model
        return "smollm2" if "smollm2" in names else next(iter(names))

    @property
    def resolved_session_store(self) -> StoreBackend:
        if self.session_store is not None:
            return self.session_store
        return "redis" if self.redis_url else "memory"

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.socketio_cors_origins.split(",") if o.strip()]


def split_keys(value: str) -> list[str]:
    """Comma-separated keys, blanks dropped."""
    return [k.strip() for k in value.split(",") if k.strip()]


def is_loopback(host: str) -> bool:
    """`localhost` (and `*.localhost`) or a loopback address (`127.0.0.0/8`, `::1`)."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: A priority class name (it is a metric label value, and appears in the keys file).
PRIORITY_CLASS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
#: Most priority classes (the `priority_class` label stays a small set).
MAX_PRIORITY_CLASSES = 8


def parse_priority_classes(value: str) -> list[str]:
    """`PRIORITY_CLASSES` text as names, highest first; `ValueError` says what is wrong."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ValueError("name at least one class")
    if len(names) > MAX_PRIORITY_CLASSES:
        raise ValueError(f"at most {MAX_PRIORITY_CLASSES} classes")
    for name in names:
        if not PRIORITY_CLASS_PATTERN.match(name):
            raise ValueError(f"class {name!r}: a lowercase letter, then up to 31 lowercase "
                             "letters, digits, _ and - expected")
    if len(set(names)) != len(names):
        raise ValueError("a class appears twice")
    return names


def parse_keys_file(text: str) -> list[tuple[str, str | None]]:
    """An API keys file as (key, priority class or None) pairs.

    One key per line, blank lines and `#` comments skipped; the key may be followed,
    after whitespace, by `priority=<class>`. A key holds no whitespace (a bearer token
    never does, RFC 6750), so anything else after it is refused (`ValueError` naming
    the line, never the key) rather than read as part of the key."""
    entries: list[tuple[str, str | None]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        key, key_class = fields[0], None
        for attribute in fields[1:]:
            name, sep, value = attribute.partition("=")
            if name != "priority" or not sep or not value or key_class is not None:
                raise ValueError(f"API_KEYS_FILE line {number}: after the key, only one "
                                 "`priority=<class>` is allowed")
            key_class = value
        entries.append((key, key_class))
    return entries


MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def parse_models(value: str) -> dict[str, Path]:
    """`MODELS` text as name → path (or embedded name); `ValueError` says what is wrong."""
    models: dict[str, Path] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, sep, path = (p.strip() for p in entry.partition("="))
        if sep and not path:
            raise ValueError(f"entry {entry!r} has no path after `=`")
        if not MODEL_NAME_PATTERN.match(name):
            raise ValueError(f"model name {name!r}: 1-64 letters, digits and _.:- expected")
        if name in models:
            raise ValueError(f"model name {name!r} appears twice")
        models[name] = Path(path if sep else name)
    if not models:
        raise ValueError("name at least one model")
    return models


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment plus explicit overrides (CLI flags win).

    Raises `ConfigError` with a one-line message naming the variable.
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = "_".join(str(p) for p in err["loc"]).upper() or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{name}: {msg}" if err["loc"] else msg)
    return "invalid setting: " + "; ".join(parts)


def _type_name(annotation: Any) -> str:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if args and len(args) < len(get_args(annotation)):  # X | None
        return f"{_type_name(args[0])}, optional"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return {"Path": "path", "str": "string", "int": "integer", "float": "number",
            "bool": "boolean", "SecretStr": "secret string"}.get(
                getattr(annotation, "__name__", ""), str(annotation))


def settings_markdown() -> str:
    """The configuration reference table, generated from the fields above."""
    lines = [
        "| Variable | Type | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    shown_defaults = {"n_threads": "CPU count", "model_cache_dir": "`~/.cache/fabricai-trio`"}
    for name, field in Settings.model_fields.items():
        default = field.default
        if name in shown_defaults:
            shown = shown_defaults[name]
        elif default is None:
            shown = "unset"
        elif default == "":
            shown = "empty"
        else:
            shown = f"`{str(default).lower() if isinstance(default, bool) else default}`"
        lines.append(
            f"| `{name.upper()}` | {_type_name(field.annotation)} | {shown} | "
            f"{field.description or ''} |"
        )
    return "\n".join(lines) + "\n"


CONFIG_DOC_HEADER = """# Configuration reference

Every setting is an environment variable (or a line in `.env` in the working
directory); `fabricai-trio serve` flags override them. Names are case-insensitive.
An invalid value stops start-up with a one-line message naming the variable (exit 2).

This file is generated from `fabricai_trio/settings.py` by `scripts/gen-config-docs`;
a test fails when it is out of date.

"""


def configuration_doc() -> str:
    return CONFIG_DOC_HEADER + settings_markdown()


def env_example() -> str:
    """`.env.example`: every setting, commented out at its default."""
    lines = [
        "# fabricai-trio settings (generated by scripts/gen-config-docs).",
        "# Copy to .env and uncomment what you change; see docs/configuration.md.",
        "",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        if name in ("n_threads", "model_cache_dir") or default is None:
            value = ""
        elif isinstance(default, bool):
            value = str(default).lower()
        else:
            value = str(default)
        lines.append(f"# {field.description}")
        lines.append(f"# {name.upper()}={value}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - used by scripts/gen-config-docs
    if "--write-docs" in sys.argv:
        root = Path(__file__).resolve().parent.parent
        (root / "docs" / "configuration.md").write_text(configuration_doc())
        (root / ".env.example").write_text(env_example())
    else:
        sys.stdout.write(settings_markdown())
