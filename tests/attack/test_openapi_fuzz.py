"""Schemathesis against the server's own `/openapi.json`: no route answers 5xx.

Every operation in the spec gets boundary values (the coverage phase), random data
(fuzzing) and linked sequences (stateful: create a session, use it, delete it), against a
real server on the real model, with auth on and a tiny token limit so generations stay
cheap. The server's log must hold no traceback afterwards: a failure after the response
headers (inside a stream) would not show as a 5xx.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ..server_process import ServerProcess, model_env

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]

KEY = "fuzz-key-0123456789abcdef"
#: Examples per operation and phase; FABRICAI_SOAK=long tries ten times more.
EXAMPLES = "200" if os.environ.get("FABRICAI_SOAK") == "long" else "15"


def schemathesis_cli() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("schemathesis is not installed (scripts/install test installs it)")
    return found


def test_no_route_answers_5xx(model_path: Path, server_logs: Path, tmp_path: Path) -> None:
    cli = schemathesis_cli()
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    env = model_env(
        model_path, MAX_TOKENS_LIMIT="4", DEFAULT_MAX_TOKENS="4", MAX_CONCURRENT_REQUESTS="2",
        MAX_QUEUE_SIZE="8", API_KEYS_FILE=str(keys),
        # One decode thread: schemathesis keeps a core busy building cases, and ggml's
        # spinning thread barriers crawl when a decode thread is descheduled (84 s with
        # the default of one thread per CPU, 52 s with one, on 2 cores).
        N_THREADS="1",
    )
    with ServerProcess(env, log_dir=server_logs) as server:
        result = subprocess.run(
            [cli, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", EXAMPLES, "--seed", "1", "--request-timeout", "30",
             "--continue-on-failure", "--header", f"Authorization: Bearer {KEY}"],
            capture_output=True, text=True, timeout=540, check=False,
            cwd=tmp_path,  # schemathesis keeps a cache in its working directory
        )
        report = result.stdout[-4000:] + result.stderr[-2000:]
        print(result.stdout[-1500:])
        assert result.returncode == 0, report
        assert " passed" in result.stdout, report
        status = httpx.get(f"{server.url}/v1/status",
                           headers={"Authorization": f"Bearer {KEY}"}).json()
        log = server.log()
    assert "Traceback" not in log, log[-4000:]
    assert status["concurrency"]["active"] == status["concurrency"]["queued"] == 0, status
