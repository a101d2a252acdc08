"""Deployment files, checked without a Docker engine (none runs on these machines)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fabricai_trio.settings import Settings, env_example

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_JS = ROOT / "tests" / "deploy"
COMPOSE_SCHEMA = DEPLOY_JS / "node_modules" / "dclint" / "schemas" / "compose.schema.json"
NOT_SETTINGS = {"PATH", "PYTHONUNBUFFERED"}
SETTINGS = {name.upper() for name in Settings.model_fields}


@pytest.fixture(scope="session")
def compose_schema() -> dict[str, Any]:
    """The Compose specification schema, shipped in the npm `dclint` package."""
    if not COMPOSE_SCHEMA.exists():
        npm = shutil.which("npm")
        assert npm, "npm is needed (scripts/test installs it)"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=DEPLOY_JS, check=True,
                       capture_output=True, timeout=300)
    schema: dict[str, Any] = json.loads(COMPOSE_SCHEMA.read_text())
    return schema


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_specification(compose_schema: dict[str, Any]) -> None:
    errors = list(jsonschema.Draft7Validator(compose_schema).iter_errors(compose()))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_compose_schema_catches_mistakes(compose_schema: dict[str, Any]) -> None:
    broken = compose()
    broken["services"]["app"]["depends_on"] = 5
    broken["services"]["app"]["bogus"] = True
    assert len(list(jsonschema.Draft7Validator(compose_schema).iter_errors(broken))) >= 2


def dockerfile_env() -> set[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("ENV "):
            names.update(re.findall(r"([A-Z_][A-Z0-9_]*)=", line))
    names.update(re.findall(r"\b([A-Z][A-Z0-9_]+)=\S+ \.venv/bin/python", text))
    return names


def compose_env() -> set[str]:
    names: set[str] = set()
    for service in compose()["services"].values():
        names.update(service.get("environment", {}) or {})
    return names


def env_example_names() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^# ([A-Z][A-Z0-9_]*)=", text, flags=re.M))


def test_every_variable_set_is_a_real_setting() -> None:
    for where, names in (
        ("Dockerfile", dockerfile_env()),
        ("docker-compose.yml", compose_env()),
        (".env.example", env_example_names()),
    ):
        assert names, where
        unknown = names - SETTINGS - NOT_SETTINGS
        assert not unknown, f"{where} sets {unknown}, which are not settings"


def test_env_example_lists_every_setting_and_is_generated() -> None:
    assert env_example_names() == SETTINGS
    assert (ROOT / ".env.example").read_text() == env_example(), "run scripts/gen-config-docs"


def test_dockerfile_installs_with_the_readme_script() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "RUN scripts/install" in dockerfile
    assert "scripts/install && .venv/bin/fabricai-trio serve" in readme.split("\n\n")[1]
    assert "USER 10001" in dockerfile and "HEALTHCHECK" in dockerfile
    assert 'CMD ["fabricai-trio", "serve"]' in dockerfile  # exec form: signals reach us


def test_nginx_compose_mounts_exist() -> None:
    lb = compose()["services"]["lb"]
    for volume in lb["volumes"]:
        source = volume.split(":")[0]
        assert (ROOT / source).is_file(), source


def test_compose_publishes_on_loopback_unless_authentication_is_on() -> None:
    """No authentication by default (AUTH_MODE=off, an explicit choice), so every
    published port is bound to 127.0.0.1; a port on all interfaces needs credentials."""
    services = compose()["services"]
    assert services["app"]["environment"]["AUTH_MODE"] == "${AUTH_MODE:-off}"
    for name, service in services.items():
        for port in service.get("ports", ()):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    settings = Settings(host="0.0.0.0", auth_mode="off")  # what the container runs
    assert not settings.auth_configured
