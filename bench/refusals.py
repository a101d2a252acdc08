"""How cheap is a refusal? 429s per second, their latency, and what a storm of them
costs two running streams, on each of the three ways a refusal can be answered.

    nice .venv/bin/python bench/refusals.py [--engine tests.fakes:FakeEngine]
        [--connections 50] [--seconds 10] [--rounds 2] [--modes raw,fast,framework]
        [--client auto|wrk|python] [--py-spy out.svg] [--no-floor]

Each round starts our server with 2 slots and no queue (`MAX_QUEUE_SIZE=0`), starts two
long streams that keep both slots busy, measures their tok/s, then `--connections`
kept-alive connections POST `/v1/completions` as fast as they can for `--seconds`
(every request refused with 429) while the streams' tok/s and the server's CPU time
are measured again. The modes: `raw` (the connection layer answers from the request's
bytes, api/raw_refusals.py: `FAST_REFUSALS=true`, `RAW_REFUSALS=true`), `fast` (over
ASGI before Quart, api/refusals.py: `RAW_REFUSALS=false`) and `framework`
(`FAST_REFUSALS=false`: every request through Quart). Rounds alternate the order of the
modes (`--modes` order, then reversed), so all are measured under the same load. The
load generator is `wrk` when it is installed (a C client that is not the bottleneck,
and sends each request in one write), else a Python client (then the rate is the
client's floor, and its requests, head and body in two writes, rarely take the raw path).

The floor: the same storm against Hypercorn (same configuration and connection class
as the server) serving a bare ASGI app that reads the body and sends a prebuilt 429:
what the HTTP server alone costs here. `--py-spy out.svg` records the server during the
storm of the first mode's first round (the `bench` extra; `out.txt`: collapsed stacks).
Prints one JSON object: every round, the median of each mode, the floor, and the ratios
(each mode over the next, each over the floor).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ServerProcess, pct
from tests.server_process import free_port

STORM_BODY = {"prompt": "Hello there", "max_tokens": 16, "stream": True}
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%s'
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %%d %%d %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# --- load generators ---


def write_wrk_script(directory: Path) -> Path:
    """The storm's `wrk` script (POST `STORM_BODY`, report in one line), in `directory`."""
    script = directory / "post.lua"
    script.write_text(WRK_SCRIPT % json.dumps(STORM_BODY))
    return script


def wrk_command(url: str, connections: int, seconds: float, script: Path) -> list[str]:
    """The storm: two `wrk` threads posting on `connections` kept-alive connections."""
    return ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s",
            "-s", str(script), f"{url}/v1/completions"]


def wrk_storm(url: str, connections: int, seconds: float, script: Path) -> dict[str, float]:
    """`wrk` for `seconds`; its own counts and latency percentiles (ms)."""
    out = subprocess.run(
        wrk_command(url, connections, seconds, script),
        capture_output=True, text=True, check=True,
    ).stdout
    match = re.search(r"^WRK (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", out, re.M)
    assert match is not None, out
    requests, duration_us, non_2xx, socket_errors, p50, p99, worst = map(int, match.groups())
    wall = duration_us / 1e6
    return {"requests": requests, "non_2xx": non_2xx, "socket_errors": socket_errors,
            "per_s": requests / wall, "p50_ms": p50 / 1000, "p99_ms": p99 / 1000,
            "max_ms": worst / 1000, "wall_s": wall}


async def python_storm(url: str, connections: int, seconds: float) -> dict[str, float]:
    """The same with httpx, one kept-alive connection per task (the client may be the
    bottleneck: a floor of the rate)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await client.post("/v1/completions", json=STORM_BODY)
                latencies.append(time.perf_counter() - start)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    wall = time.perf_counter() - start
    requests = sum(statuses.values())
    return {"requests": requests, "non_2xx": requests - statuses.get(200, 0),
            "socket_errors": 0, "per_s": requests / wall, "p50_ms": pct(latencies, 50) * 1000,
            "p99_ms": pct(latencies, 99) * 1000, "max_ms": max(latencies) * 1000,
            "wall_s": wall}


async def storm(url: str, args: argparse.Namespace, script: Path) -> dict[str, float]:
    if args.client == "wrk":
        return await trio.to_thread.run_sync(
            wrk_storm, url, args.connections, args.seconds, script)
    return await python_storm(url, args.connections, args.seconds)


# --- one round against our server ---


async def stream_forever(url: str, ticks: list[float], stop: trio.Event) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 8000, "stream": True,
            "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.status_code
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                ticks.append(time.perf_counter())
            if stop.is_set():
                return


def counter(metrics: str, name: str, **labels: str) -> float:
    """The sum of a counter's samples that carry `labels`."""
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def measure_round(url: str, pid: int, args: argparse.Namespace, script: Path,
                        spy_to: str | None) -> dict[str, Any]:
    ticks: list[float] = []
    stop = trio.Event()
    async with trio.open_nursery() as nursery, httpx.AsyncClient(base_url=url) as http:
        for _ in range(2):
            nursery.start_soon(stream_forever, url, ticks, stop)
            await trio.sleep(1)  # admitted one after the other (there is no queue)
        await trio.sleep(2)  # both streams decoding
        n0, t0, cpu_base = len(ticks), time.perf_counter(), cpu_seconds(pid)
        await trio.sleep(args.seconds)
        base_wall = time.perf_counter() - t0
        before = (len(ticks) - n0) / base_wall
        streams_cpu = (cpu_seconds(pid) - cpu_base) / base_wall  # CPU s per s, streams only
        spy = None
        if spy_to:
            spy = subprocess.Popen(  # noqa: ASYNC220 (started, then awaited in a thread)
                ["py-spy", "record", "-p", str(pid), "-o", spy_to, "-d", str(int(args.seconds)),
                 "-r", "200", "--nonblocking",
                 *(["--format", "raw"] if spy_to.endswith(".txt") else [])],
                stdout=sys.stderr)  # stdout is the report
        metrics0 = (await http.get("/metrics")).text
        cpu0, n1, t1 = cpu_seconds(pid), len(ticks), time.perf_counter()
        result: dict[str, Any] = await storm(url, args, script)
        during = (len(ticks) - n1) / (time.perf_counter() - t1)
        cpu = cpu_seconds(pid) - cpu0
        metrics1 = (await http.get("/metrics")).text
        if spy is not None:
            await trio.to_thread.run_sync(spy.wait)
        refused = counter(metrics1, "fabricai_http_requests_total", status="429") - counter(
            metrics0, "fabricai_http_requests_total", status="429")
        fast = counter(metrics1, "fabricai_fast_refusals_total") - counter(
            metrics0, "fabricai_fast_refusals_total")
        ratio = during / before if before else 1.0
        # The streams' own CPU (their rate before the storm, scaled to their rate during
        # it) is not the refusals'.
        net = cpu - streams_cpu * result["wall_s"] * ratio
        result.update(
            refused_429=refused, answered_fast=fast,
            refusals_per_s=refused / result["wall_s"],
            server_cpu_ms_per_refusal=1000 * cpu / refused if refused else None,
            server_cpu_ms_per_refusal_net=1000 * net / refused if refused else None,
            streams_cpu_share=streams_cpu,
            stream_tok_s_before=before, stream_tok_s_during=during, stream_ratio=ratio,
        )
        stop.set()
        nursery.cancel_scope.cancel()
    return result


#: The ways a refusal can be answered: FAST_REFUSALS and RAW_REFUSALS of each.
MODES = {"raw": ("true", "true"), "fast": ("true", "false"), "framework": ("false", "false")}


def server_env(args: argparse.Namespace, mode: str) -> dict[str, str]:
    fast, raw = MODES[mode]
    env = {"ENGINE": args.engine, "MAX_CONCURRENT_REQUESTS": "2", "MAX_QUEUE_SIZE": "0",
           "N_CTX": "16384", "N_THREADS": str(args.threads), "MAX_TOKENS_LIMIT": "8192",
           "FAST_REFUSALS": fast, "RAW_REFUSALS": raw, "LOG_LEVEL": "INFO"}
    if args.engine in ("batched", "llama"):
        from fabricai_trio.engine.model_files import embedded_model_path
        from fabricai_trio.settings import Settings

        env["LLM_MODEL"] = str(embedded_model_path(Settings().model_cache_dir))
    return env


# --- the floor: a bare ASGI 429 under the same Hypercorn ---

BARE_BODY = json.dumps({"error": {"code": "queue_full", "message": "full", "param": None,
                                  "type": "rate_limit_error"}}).encode() + b"\n"
BARE_HEADERS = [(b"content-type", b"application/json"),
                (b"content-length", str(len(BARE_BODY)).encode()), (b"retry-after", b"1"),
                (b"x-request-id", b"0123456789abcdef0123456789abcdef")]


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the request body, answer a prebuilt 429: the least an ASGI app can do."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 429, "headers": BARE_HEADERS})
    await send({"type": "http.response.body", "body": BARE_BODY})


def serve_bare(port: int) -> None:
    """Hypercorn as our server runs it (`server.hypercorn_config`, `GuardedTCPServer`)."""
    from hypercorn.trio import serve

    from fabricai_trio.server import hypercorn_config
    from fabricai_trio.settings import Settings

    config = hypercorn_config(Settings(port=port))  # type: ignore[call-arg]
    trio.run(serve, bare_app, config)


@contextmanager
def bare_server() -> Iterator[tuple[str, int]]:
    """The floor's server in a process of its own, serving: (its URL, its pid)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.post(url, json={})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the bare server did not start"
                time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait()


def measure_floor(args: argparse.Namespace, script: Path) -> dict[str, Any]:
    with bare_server() as (url, pid):
        cpu0 = cpu_seconds(pid)
        result: dict[str, Any] = trio.run(storm, url, args, script)
        cpu = cpu_seconds(pid) - cpu0
    result.update(server_cpu_ms_per_refusal=1000 * cpu / result["requests"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", default="tests.fakes:FakeEngine")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="per mode, alternating")
    parser.add_argument("--modes", default="raw,fast,framework",
                        help="of raw (the connection layer), fast (over ASGI), framework")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--py-spy", default=None)
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    report: dict[str, Any] = {"engine": args.engine, "client": args.client,
                              "connections": args.connections, "seconds": args.seconds,
                              "load_average_start": load_average(), "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        script = write_wrk_script(Path(tmp))
        spy_to = args.py_spy
        modes = args.modes.split(",")
        for i in range(args.rounds):
            for mode in modes if i % 2 == 0 else modes[::-1]:
                with ServerProcess(server_env(args, mode), log_dir=Path(tmp)) as srv:
                    assert srv.proc is not None
                    result = trio.run(measure_round, srv.url, srv.proc.pid, args, script,
                                      spy_to if mode == modes[0] else None)
                    if mode == modes[0]:
                        spy_to = None
                result.update(mode=mode, load_average=load_average())
                report["rounds"].append(result)
                print(json.dumps(result), file=sys.stderr)
        if not args.no_floor:
            report["floor_bare_asgi"] = measure_floor(args, script)
    for mode in modes:
        rounds = [r for r in report["rounds"] if r["mode"] == mode]
        report[mode] = {key: sorted(r[key] for r in rounds)[len(rounds) // 2]
                        for key in ("refusals_per_s", "p50_ms", "p99_ms",
                                    "server_cpu_ms_per_refusal_net", "stream_ratio")}
    ratios = {}
    for a, b in itertools.pairwise(modes):
        ratios[f"{a}_over_{b}_refusals_per_s"] = (
            report[a]["refusals_per_s"] / report[b]["refusals_per_s"])
        ratios[f"{a}_over_{b}_cpu_per_refusal"] = (
            report[a]["server_cpu_ms_per_refusal_net"] / report[b]["server_cpu_ms_per_refusal_net"])
    floor = report.get("floor_bare_asgi")
    if floor:
        for mode in modes:
            ratios[f"{mode}_over_floor_cpu_per_refusal"] = (
                report[mode]["server_cpu_ms_per_refusal_net"] / floor["server_cpu_ms_per_refusal"])
            ratios[f"{mode}_over_floor_refusals_per_s"] = (
                report[mode]["refusals_per_s"] / floor["per_s"])
    report["ratios"] = ratios
    report["load_average_end"] = load_average()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
