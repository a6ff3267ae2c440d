"""Serve a checkpoint over OpenAI's chat-completions protocol.

    python -m slm.serve --model DIR [--name ID] [--host 127.0.0.1] [--port 8000] [--kernels attention=triton]
                        [--max-batch 32] [--max-queue 256] [--api-key KEY]
"""

import argparse
import logging
from pathlib import Path

import torch
import uvicorn

from .. import load_model, load_tokenizer
from .app import make_app
from .worker import Worker


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m slm.serve", description=__doc__)
    parser.add_argument("--model", required=True, help="a checkpoint directory that train.py saved")
    parser.add_argument("--name", help="the model id clients send (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on")
    parser.add_argument("--kernels", nargs="*", default=[], help="slm.kernels choices, e.g. attention=triton")
    parser.add_argument("--max-batch", type=int, default=32, help="the most waiting requests decoded as one batch")
    parser.add_argument("--max-queue", type=int, default=256, help="the most waiting requests; more get 429")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    args = parser.parse_args(argv)
    if args.max_batch < 1 or args.max_queue < 1:
        parser.error(f"--max-batch and --max-queue must be at least 1, got {args.max_batch} and {args.max_queue}")
    bad_kernels = [choice for choice in args.kernels if "=" not in choice]
    if bad_kernels:
        parser.error(f"--kernels takes OP=NAME choices (e.g. attention=triton), got {bad_kernels}")
    kernels = dict(choice.split("=", 1) for choice in args.kernels)
    # Errors inside the server are logged here with their traceback; clients get a 500 without it.
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device, **({"kernels": kernels} if kernels else {}))
    tok = load_tokenizer(args.model)
    name = args.name or Path(args.model).resolve().name
    worker = Worker(model, tok, args.max_batch, args.max_queue)
    uvicorn.run(make_app(worker, name, args.api_key), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
