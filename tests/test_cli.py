"""Start-up and shutdown of the real `fabricai-trio serve` process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .server_process import REPO, ServerProcess, model_env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fabricai_trio", *args],
        env={**os.environ, "PORT": "0", **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MAX_CONCURRENT_REQUESTS": "zero"}, "MAX_CONCURRENT_REQUESTS"),
        ({"MAX_QUEUE_SIZE": "-1"}, "MAX_QUEUE_SIZE"),
        ({"PORT": "70000"}, "PORT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"SSE_KEEPALIVE_SECONDS": "0"}, "SSE_KEEPALIVE_SECONDS"),
        ({"SESSION_STORE": "redis"}, "REDIS_URL"),
    ],
)
def test_invalid_setting_is_one_line_and_exit_2(env: dict[str, str], variable: str) -> None:
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


def test_flag_overrides_env_and_is_validated() -> None:
    result = run_cli("serve", "--max-concurrent", "0", env={"MAX_CONCURRENT_REQUESTS": "4"})
    assert result.returncode == 2
    assert "MAX_CONCURRENT_REQUESTS" in result.stderr


def test_missing_model_file(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", str(tmp_path / "nope.gguf"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_not_a_model_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"hello, I am not a model")
    result = run_cli("serve", "--model", str(path))
    assert result.returncode == 2
    assert "not a GGUF model file" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_model_stops_start_up(tmp_path: Path, model_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(model_path.read_bytes()[:4096])  # a truncated real model
    result = run_cli("serve", "--model", str(path), env={"PORT": str(_free_port())})
    assert result.returncode == 1
    assert "cannot load" in result.stderr
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    from .server_process import free_port

    return free_port()


@pytest.mark.model
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_embedded_default_model_serves_and_stops_cleanly(
    sig: int, server_logs: Path, model_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LLM_MODEL"}
    proc = ServerProcess({"LLM_MODEL": ""}, log_dir=server_logs)
    proc.env = {**env, **{k: v for k, v in proc.env.items() if k in ("HOST", "PORT")}}
    with proc:
        status = httpx.get(f"{proc.url}/v1/status", timeout=10).json()
        # MODELS' default: both embedded models, SmolLM2 Instruct the default one.
        assert status["model"]["name"] == status["default_model"] == "smollm2"
        assert status["model"]["chat_format"] == "gguf"
        assert status["models"]["gemma3"]["model"]["chat_format"] == "gemma"
        assert status["store"]["backend"] == "memory"
        code = proc.stop(sig)
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log()


@pytest.mark.model
@pytest.mark.parametrize("engine", ["batched", "llama"])
def test_sigterm_during_model_load_exits_cleanly_and_frees_the_engine(
    engine: str, server_logs: Path, model_path: Path
) -> None:
    """SIGTERM while the model loads: the load's thread is waited for (never
    abandoned), then the services nursery closes the engine, and the process exits 0."""
    proc = ServerProcess(
        {"LLM_MODEL": str(model_path), "CHAT_FORMAT": "gemma", "ENGINE": engine},
        log_dir=server_logs,
    )
    popen = subprocess.Popen(
        [sys.executable, "-m", "fabricai_trio", "serve"], env=proc.env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert popen.stdout is not None
    lines = []
    for line in popen.stdout:
        lines.append(line)
        if "loading the model" in line:
            popen.send_signal(signal.SIGTERM)
            break
    try:
        rest, _ = popen.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        popen.kill()
        raise
    log = "".join(lines) + rest
    assert popen.returncode == 0, log
    assert "Traceback" not in log
    # The engine was closed after the load task ended, not beside it.
    assert "services stopped: engines, session store and Redis client closed" in log, log
    assert log.index("loading the model") < log.index("services stopped")


@pytest.mark.model
def test_a_ready_server_freezes_its_start_up_objects_and_serves_on(
    server_logs: Path, model_path: Path
) -> None:
    with ServerProcess(model_env(model_path, LOG_LEVEL="DEBUG"), log_dir=server_logs) as proc:
        deadline = time.monotonic() + 60
        while (found := re.search(r"froze (\d+) start-up objects", proc.log())) is None:
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.1)
        assert int(found.group(1)) > 10_000  # modules, the app, the model's Python side
        reply = httpx.post(f"{proc.url}/v1/completions", timeout=60,
                           json={"prompt": "The capital of France is", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
        assert proc.stop() == 0
