"""RealtimeConfig: validation, reference values, and reading the app settings."""

from __future__ import annotations

import pytest

from fabricai_trio.realtime.config import RealtimeConfig
from fabricai_trio.settings import Settings


def test_reference_values() -> None:
    ref = RealtimeConfig.reference()
    assert (ref.ping_interval_ms, ref.ping_timeout_ms) == (300, 200)
    assert ref.max_payload_bytes == 1_000_000
    assert ref.connect_timeout_s == 1.0
    assert ref.cors_origins == ("*",)


def test_from_settings() -> None:
    settings = Settings(
        socketio_ping_interval_ms=1000,
        socketio_ping_timeout_ms=500,
        socketio_max_payload=2048,
        socketio_connect_timeout_ms=3000,
        socketio_cors_origins="http://a.example, http://b.example",
    )
    config = RealtimeConfig.from_settings(settings)
    assert config.ping_interval_s == 1.0 and config.ping_timeout_s == 0.5
    assert config.max_payload_bytes == 2048
    assert config.connect_timeout_ms == 3000
    assert config.cors_origins == ("http://a.example", "http://b.example")
    assert RealtimeConfig.from_settings(Settings(socketio_cors_origins="")).cors_origins == ()


@pytest.mark.parametrize("bad", [{"ping_interval_ms": 0}, {"max_payload_bytes": -1}, {"path": "x"}])
def test_invalid_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RealtimeConfig(**bad)  # type: ignore[arg-type]
