"""slm.serve under load: 16 concurrent vs 16 sequential requests (wall time ratio, tokens/s, p50/p95 latency).

    python -m bench.serve --model out/final            # a saved checkpoint
    python -m bench.serve --tiny ../shared/opt         # a random 2-layer model with OPT's tokenizer (CPU check)

The server runs as a subprocess on 127.0.0.1 on a free port and is stopped by pid at the end.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model")
    group.add_argument("--tiny", metavar="TOKENIZER_DIR")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_checkpoint(args.tiny, Path(tmp) / "tiny")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "slm.serve", "--model", str(model), "--name", "m",
                                   "--port", str(port), "--max-batch", str(args.requests)])
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
                    tool_choice="required", temperature=0, max_tokens=args.max_tokens)
                return time.perf_counter() - start, answer.usage.completion_tokens

            one(-1)   # warm-up
            for label, run in (("sequential", lambda: [one(i) for i in range(args.requests)]),
                               ("concurrent", lambda: list(concurrent.futures.ThreadPoolExecutor(args.requests)
                                                           .map(one, range(args.requests))))):
                start = time.perf_counter()
                results = run()
                wall = time.perf_counter() - start
                latencies = sorted(r[0] for r in results)
                tokens = sum(r[1] for r in results)
                p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
                print(f"{label}: {args.requests} requests in {wall:.2f} s, {tokens / wall:.1f} tokens/s, "
                      f"p50 {p(0.5):.2f} s, p95 {p(0.95):.2f} s")
                if label == "sequential":
                    sequential = wall
            print(f"sequential / concurrent wall time: {sequential / wall:.2f}x")
        finally:
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
