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


def test_constraint_warmup_is_on_by_default_and_applies_to_every_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CONSTRAINT_WARMUP", raising=False)  # tests/conftest.py sets it
    monkeypatch.delenv("LLM_MODEL", raising=False)
    assert load_settings().constraint_warmup is True
    monkeypatch.setenv("CONSTRAINT_WARMUP", "false")
    served = load_settings(models="gemma3,smollm2").served_models()
    assert [s.constraint_warmup for s in served.values()] == [False, False]


def test_store_defaults_follow_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().resolved_session_store == "memory"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert load_settings().resolved_session_store == "redis"


def test_models_default_to_both_embedded_with_the_instruct_one_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("LLM_MODEL", "MODELS", "DEFAULT_MODEL", "MODEL_ALIAS"):
        monkeypatch.delenv(name, raising=False)
    served = load_settings().served_models()
    assert list(served) == ["smollm2", "gemma3"]
    assert served["gemma3"].llm_model == Path("gemma3")
    assert served["gemma3"].model_alias == "gemma3"


def test_models_entries_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_MODEL", raising=False)
    settings = load_settings(models=" gemma3 , mine=/m/x.gguf ", default_model="mine")
    assert {n: s.llm_model for n, s in settings.served_models().items()} == {
        "mine": Path("/m/x.gguf"), "gemma3": Path("gemma3")}
    assert load_settings(models="gemma3,b=/b.gguf").resolved_default_model == "gemma3"
    # LLM_MODEL is the one-model shorthand: MODELS is not used.
    assert load_settings(llm_model="smollm2", models="gemma3").served_models() == {}


@pytest.mark.parametrize(("models", "default", "message"), [
    ("a,a=/x.gguf", None, "MODELS: model name 'a' appears twice"),
    ("a=", None, "MODELS: entry 'a=' has no path after `=`"),
    ("bad name=/x.gguf", None, "MODELS: model name 'bad name'"),
    (" , ", None, "MODELS: name at least one model"),
    ("gemma3", "smollm2", "DEFAULT_MODEL: 'smollm2' is not one of MODELS (gemma3)"),
])
def test_bad_models_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, models: str, default: str | None, message: str
) -> None:
    monkeypatch.delenv("LLM_MODEL", raising=False)
    with pytest.raises(ConfigError) as info:
        load_settings(models=models, default_model=default)
    assert message in str(info.value)


def test_rate_limits_in_redis_with_api_keys_need_the_owner_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each replica must turn a key into the same owner id, or each would keep its own
    bucket for it."""
    for name, value in (("API_KEYS", "k1"), ("REDIS_URL", "redis://127.0.0.1:1/0"),
                        ("SESSION_STORE", "memory"), ("RATE_LIMIT_REQUESTS_PER_MINUTE", "10")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="OWNER_ID_SECRET"):
        load_settings()
    monkeypatch.setenv("OWNER_ID_SECRET", "s" * 32)
    assert load_settings().rate_limit_requests_per_minute == 10


def test_priority_classes_and_their_default(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.priority_class_names == ["high", "normal", "low"]
    assert settings.resolved_priority_default_class == "normal"
    monkeypatch.setenv("PRIORITY_CLASSES", " gold , silver,bronze ")
    assert load_settings().priority_class_names == ["gold", "silver", "bronze"]
    assert load_settings().resolved_priority_default_class == "bronze"  # no `normal`
    monkeypatch.setenv("PRIORITY_DEFAULT_CLASS", "silver")
    assert load_settings().resolved_priority_default_class == "silver"


@pytest.mark.parametrize(("classes", "default", "message"), [
    ("", None, "PRIORITY_CLASSES: name at least one class"),
    ("a,b,c,d,e,f,g,h,i", None, "PRIORITY_CLASSES: at most 8"),
    ("high,High", None, "PRIORITY_CLASSES: class 'High'"),
    ("high,high", None, "PRIORITY_CLASSES: a class appears twice"),
    ("high,low", "normal", "PRIORITY_DEFAULT_CLASS: 'normal' is not one of"),
])
def test_bad_priority_classes_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, classes: str, default: str | None, message: str,
) -> None:
    monkeypatch.setenv("PRIORITY_CLASSES", classes)
    if default is not None:
        monkeypatch.setenv("PRIORITY_DEFAULT_CLASS", default)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert message in str(info.value)


def test_keys_file_classes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nsk-one\n  sk-two   priority=high \n\nsk-three priority=low\n")
    settings = load_settings(api_keys_file=path)
    assert settings.file_api_keys() == ["sk-one", "sk-two", "sk-three"]
    assert settings.file_api_key_classes() == {"sk-two": "high", "sk-three": "low"}


@pytest.mark.parametrize(("line", "message"), [
    ("sk-one priority=urgent", "names the priority class 'urgent', which is not one of"),
    ("sk-one urgent", "line 2: after the key, only one `priority=<class>`"),
    ("sk-one priority=high priority=low", "line 2: after the key"),
    ("sk-one priority=", "line 2: after the key"),
])
def test_a_keys_file_with_a_bad_class_refuses_to_start(
    tmp_path: Path, line: str, message: str,
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"sk-zero\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(api_keys_file=path)
    assert message in str(info.value)
    assert "sk-one" not in str(info.value)  # a key never appears in an error
