"""Settings: validation messages and the generated configuration reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabricai_trio.settings import ConfigError, configuration_doc, load_settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_doc_is_up_to_date() -> None:
    assert DOC.read_text() == configuration_doc(), "run scripts/gen-config-docs"


def test_every_setting_is_documented() -> None:
    from fabricai_trio.settings import Settings

    text = DOC.read_text()
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in text


def test_error_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("N_CTX", "lots")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("invalid setting: N_CTX:")
    assert "\\n" not in str(info.value)


def test_cross_field_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFAULT_MAX_TOKENS", "900")
    monkeypatch.setenv("MAX_TOKENS_LIMIT", "100")
    with pytest.raises(ConfigError, match="DEFAULT_MAX_TOKENS"):
        load_settings()


def test_overrides_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    assert load_settings(port=9100).port == 9100
    assert load_settings(port=None).port == 9000


def test_store_defaults_follow_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().resolved_session_store == "memory"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert load_settings().resolved_session_store == "redis"
