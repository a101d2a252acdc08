"""The runnable examples in the docs (fenced blocks tagged `test`) against a real server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .server_process import REPO, ServerProcess

pytestmark = pytest.mark.model

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+) test\n(.*?)^```", re.M | re.S)
JS_DIR = REPO / "tests" / "js"


def examples() -> list[tuple[str, str, str]]:
    found = []
    for doc in DOCS:
        for n, (lang, code) in enumerate(BLOCK.findall(doc.read_text())):
            found.append((f"{doc.name}#{n}-{lang}", lang, code))
    return found


@pytest.fixture(scope="module")
def docs_server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    with ServerProcess({"LLM_MODEL": str(model_path)}, log_dir=server_logs) as proc:
        yield proc


def test_there_are_examples() -> None:
    assert {lang for _, lang, _ in examples()} >= {"sh", "python", "js"}


@pytest.mark.parametrize(("name", "lang", "code"), examples(), ids=[e[0] for e in examples()])
def test_example_runs(docs_server: ServerProcess, tmp_path: Path, name: str, lang: str,
                      code: str) -> None:
    code = code.replace("localhost:8000", f"127.0.0.1:{docs_server.port}")
    if lang == "sh":
        command = ["bash", "-euo", "pipefail", "-c", code]
    elif lang == "python":
        command = [sys.executable, "-c", code]
    else:
        assert shutil.which("node"), "node is needed (scripts/test installs it)"
        script = JS_DIR / f"_doc_example_{tmp_path.name}.mjs"  # resolves tests/js/node_modules
        script.write_text(code)
        command = ["node", str(script)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    finally:
        if lang == "js":
            script.unlink()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), f"{name} printed nothing"
