"""The hacking guide's example engine, loaded through ENGINE=module:Class."""

from __future__ import annotations

from pathlib import Path

import httpx

from .server_process import ServerProcess
from .sse_client import parse_lines


def test_engine_loads_by_module_and_class(server_logs: Path) -> None:
    env = {"ENGINE": "examples.echo_engine:EchoEngine", "LLM_MODEL": "", "MODELS": "echo"}
    with ServerProcess(env, log_dir=server_logs) as proc:
        status = httpx.get(f"{proc.url}/v1/status").json()
        assert status["model"]["name"] == "echo"
        response = httpx.post(
            f"{proc.url}/v1/inference_sse",
            json={"prompt": "one two three four", "max_tokens": 3},
        )
        events = list(parse_lines(iter(response.text.splitlines())))
        complete = next(e for e in events if e.event == "complete").data
        assert complete["text"] == "one two three"
        assert complete["finish_reason"] == "length"
        assert complete["usage"] == {"prompt_tokens": 4, "completion_tokens": 3,
                                     "total_tokens": 7}


def test_bad_engine_setting_stops_start_up(server_logs: Path) -> None:
    import subprocess
    import sys

    from .server_process import REPO

    result = subprocess.run(
        [sys.executable, "-m", "fabricai_trio", "serve"],
        env={"ENGINE": "examples.nope:Missing", "PATH": "/usr/bin:/bin"},
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "ENGINE" in result.stderr and "Traceback" not in result.stderr


def test_the_example_imports_only_the_core_layer() -> None:
    """A plug-in engine needs the engine contract and nothing of the server (DESIGN §1)."""
    import ast

    source = (Path(__file__).resolve().parent.parent / "examples" / "echo_engine.py")
    ours = {
        node.module
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module
        and node.module.startswith("fabricai_trio")
    }
    assert ours  # it does use the contract
    assert all(m.startswith("fabricai_trio.core.") or m == "fabricai_trio.settings"
               for m in ours), ours
