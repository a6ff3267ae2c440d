"""slm.serve under load: 16 concurrent vs 16 sequential requests (wall time ratio, tokens/s, p50/p95 latency).

    python -m bench.serve --model out/final            # a saved checkpoint
    python -m bench.serve --tiny ../shared/opt         # a random 2-layer model with OPT's tokenizer (CPU check)

The server runs as a subprocess on 127.0.0.1 on a free port and is stopped by pid at the end. From
Python: `run(model=..., tiny=..., requests, max_tokens)` returns the figures as a dict.
"""

import argparse
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import torch

import slm

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tiny_checkpoint(tokenizer_dir: str, directory: Path) -> Path:
    torch.manual_seed(0)
    config = slm.OPTConfig(vocab_size=50272, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           ffn_dim=64, max_position_embeddings=2048, word_embed_proj_dim=32)
    slm.save_model(slm.OPT(config).eval(), directory, tokenizer=slm.load_tokenizer(tokenizer_dir))
    return directory


def serve_and_measure(model: Path, requests: int, max_tokens: int) -> dict:
    """Starts slm.serve on `model` (127.0.0.1, a free port), sends `requests` requests one after another and
    then all at once, stops the server by pid; the figures of each run and the wall-time ratio."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "slm.serve", "--model", str(model), "--name", "m",
                               "--port", str(port), "--max-batch", str(requests)])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600)
        for _ in range(600):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.2)

        def one(i):
            start = time.perf_counter()
            answer = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"Weather in city {i}?"}], tools=[WEATHER],
                tool_choice="required", temperature=0, max_tokens=max_tokens)
            return time.perf_counter() - start, answer.usage.completion_tokens

        one(-1)   # warm-up
        result = {"requests": requests, "max_tokens": max_tokens}
        for label, send in (("sequential", lambda: [one(i) for i in range(requests)]),
                            ("concurrent", lambda: list(concurrent.futures.ThreadPoolExecutor(requests)
                                                        .map(one, range(requests))))):
            start = time.perf_counter()
            answers = send()
            wall = time.perf_counter() - start
            latencies = sorted(a[0] for a in answers)
            p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
            result[label] = {"wall_s": wall, "tokens_s": sum(a[1] for a in answers) / wall, "p50_s": p(0.5),
                             "p95_s": p(0.95)}
        result["sequential_over_concurrent"] = result["sequential"]["wall_s"] / result["concurrent"]["wall_s"]
        return result
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def run(model: str | None = None, tiny: str | None = None, requests: int = 16, max_tokens: int = 64) -> dict:
    """serve_and_measure on the checkpoint `model`, or on a tiny random one with the tokenizer in `tiny`."""
    with tempfile.TemporaryDirectory() as tmp:
        return serve_and_measure(Path(model) if model else tiny_checkpoint(tiny, Path(tmp) / "tiny"), requests,
                                 max_tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model")
    group.add_argument("--tiny", metavar="TOKENIZER_DIR")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    result = run(args.model, args.tiny, args.requests, args.max_tokens)
    for label in ("sequential", "concurrent"):
        r = result[label]
        print(f"{label}: {args.requests} requests in {r['wall_s']:.2f} s, {r['tokens_s']:.1f} tokens/s, "
              f"p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s")
    print(f"sequential / concurrent wall time: {result['sequential_over_concurrent']:.2f}x")


if __name__ == "__main__":
    main()
