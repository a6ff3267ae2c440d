"""StableToolBench's own virtual API server and pass-rate judge, run from ../shared for tests.

    python = stb.python()                          # .stb-venv/, built once from their pinned requirements
    with stb.server(tmp_path) as url:              # uvicorn on 127.0.0.1:<free port>, stopped by pid
        env = slm.tool_env.server_env(query, url)
    with stb.StandInJudgeModel() as judge:         # an OpenAI-style endpoint on 127.0.0.1 that says "Solved"
        stb.run_judge(out_dir, ["G1_instruction"], judge.url, tmp_path / "judged")

StableToolBench pins versions (fastapi 0.110, pydantic 1.10, ...) that must not meet ours, so its code
runs in a virtual environment of its own, `.stb-venv/` at the repository root (gitignored), built
from PyPI the first time (~40 s) and reused while its `ready` file names the same requirements.
See ../shared/stabletoolbench/README.md for the protocol, the cache and the judge's pitfalls.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, SHARED

STB = SHARED / "stabletoolbench"
VENV = REPO / ".stb-venv"
# The server's pins, plus what the judge imports (its requirements.txt omits backoff).
JUDGE_REQUIREMENTS = ["numpy", "tqdm", "pandas", "backoff"]
running: dict[str, subprocess.Popen] = {}   # URL -> the server process behind it, while it runs


def require_shared() -> None:
    if not STB.is_dir():
        pytest.skip(f"{STB} is absent: these tests run StableToolBench's server and judge from the shared folder")


def python() -> Path:
    """The virtual environment's interpreter, building the environment when it is missing or stale."""
    require_shared()
    requirements = (STB / "server/requirements.txt").read_text() + "\n".join(JUDGE_REQUIREMENTS)
    ready, interpreter = VENV / "ready", VENV / "bin/python"
    if ready.is_file() and ready.read_text() == requirements and interpreter.is_file():
        return interpreter
    steps = [[sys.executable, "-m", "venv", "--clear", str(VENV)],
             [str(interpreter), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              "-r", str(STB / "server/requirements.txt"), *JUDGE_REQUIREMENTS]]
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building {VENV} failed: {' '.join(command)} exited with {done.returncode}:\n"
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    ready.write_text(requirements)
    return interpreter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"StableToolBench's server exited with {process.returncode}; its log {log}:\n"
                               f"{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"StableToolBench's server did not listen on 127.0.0.1:{port} within {seconds:g} s; "
                       f"its log {log}:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def server(workdir: Path):
    """StableToolBench's server (server/main.py) with the example cache; yields its /virtual URL.

    It reads ./config.yml from its working directory: a copy of the shared offline one with absolute
    paths, so a cache miss fails at once (HTTP 500) instead of asking RapidAPI or an LLM.
    """
    interpreter = python()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    settings = {"cache_folder": STB / "tool_response_cache_example", "log_file": workdir / "requests.log",
                "tools_folder": SHARED / "toolbench/tools/toolenv2404", "port": port}
    lines = [line for line in (STB / "server/config.yml").read_text().splitlines()
             if line.split(":")[0] not in settings]
    lines += [f"{key}: {json.dumps(str(value)) if isinstance(value, Path) else value}"
              for key, value in settings.items()]
    (workdir / "config.yml").write_text("\n".join(lines) + "\n")
    log = workdir / "server.out"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(interpreter), "-m", "uvicorn", "main:app", "--app-dir", str(STB / "server"),
             "--host", "127.0.0.1", "--port", str(port)], cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/virtual"
    running[url] = process
    try:
        wait_for_port(port, process, log)
        yield url
    finally:
        stop(process)
        del running[url]


def stop(process: subprocess.Popen) -> None:
    """Stop a process we started, by its pid: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


class StandInJudgeModel:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 answering every function call with "Solved".

    The judge asks with `tool_choice` naming one function and reads
    `choices[0].message.tool_calls[0].function.arguments`; this answers in that shape, so the test checks
    that the judge reads our files, not any verdict's quality. `requests` counts what it was asked.
    """

    def __init__(self):
        self.requests: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(request)
                function = request["tool_choice"]["function"]["name"]
                arguments = {"answer_status": "Solved", "task_status": "Solvable", "reason": "stand-in judge"}
                body = json.dumps({
                    "id": "stand-in", "object": "chat.completion", "created": 0, "model": request["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant", "content": None, "tool_calls": [{
                            "id": "call-0", "type": "function",
                            "function": {"name": function, "arguments": json.dumps(arguments)}}]}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):   # keep the test output quiet
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.http.shutdown()
        self.http.server_close()


def run_judge(out: Path, subsets: list[str], model_url: str, save_path: Path, times: int = 2):
    """StableToolBench's eval_pass_rate.py on evaluate.py's --out folder, as the README's command runs it."""
    interpreter = python()
    save_path.mkdir(parents=True, exist_ok=True)
    pool = save_path / "pool.json"
    pool.write_text(json.dumps([{"api_key": "stand-in", "api_base": model_url}]))
    environment = {**os.environ, "API_POOL_FILE": str(pool), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    return subprocess.run(
        [str(interpreter), "eval_pass_rate.py", "--converted_answer_path", str(out), "--save_path", str(save_path),
         "--reference_model", "predictions", "--test_ids", str(out / "test_query_ids"), "--test_set", *subsets,
         "--evaluate_times", str(times), "--max_eval_threads", "2"],
        cwd=STB / "toolbench/tooleval", env=environment, capture_output=True, text=True, timeout=120)
