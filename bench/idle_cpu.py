"""CPU an idle server uses: the default two models loaded, nothing to decode.

    .venv/bin/python bench/idle_cpu.py [--engine batched|llama] [--seconds 10]

Starts a real server with MODELS at its default (gemma3 and smollm2), sends one short
request to each model (so both engines have run), waits two seconds, then reads the
process's user + system CPU time from /proc/<pid>/stat (clock ticks, 10 ms) before and
after `--seconds` of idling. An engine that polls instead of waiting shows here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="batched", choices=["batched", "llama"])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    env = {"LLM_MODEL": "", "CHAT_FORMAT": "", "ENGINE": args.engine}
    with tempfile.TemporaryDirectory() as logs, ServerProcess(env, log_dir=Path(logs)) as proc:
        assert proc.proc is not None
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            for card in client.get("/v1/models").json()["data"]:
                client.post("/v1/inference_sse",
                            json={"model": card["id"], "prompt": "Hi", "max_tokens": 4})
        time.sleep(2.0)
        before, started = cpu_seconds(proc.proc.pid), time.monotonic()
        time.sleep(args.seconds)
        used, elapsed = cpu_seconds(proc.proc.pid) - before, time.monotonic() - started
    print(f"ENGINE={args.engine}, two models idle: {used:.2f} s CPU in {elapsed:.1f} s "
          f"({100 * used / elapsed:.2f} % of one core)")


if __name__ == "__main__":
    main()
