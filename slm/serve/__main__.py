"""python -m slm.serve --model DIR [--name ID] [--host 127.0.0.1] [--port 8000] [--kernels ...]
[--max-batch 32] [--api-key KEY]"""

import argparse
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
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--kernels", nargs="*", default=[], help="slm.kernels choices, e.g. attention=triton")
    parser.add_argument("--max-batch", type=int, default=32, help="the most waiting requests decoded as one batch")
    parser.add_argument("--queue", type=int, default=256, help="the most waiting requests; more get 429")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    args = parser.parse_args(argv)
    kernels = dict(choice.split("=", 1) for choice in args.kernels)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device, **({"kernels": kernels} if kernels else {}))
    tok = load_tokenizer(args.model)
    name = args.name or Path(args.model).resolve().name
    worker = Worker(model, tok, args.max_batch, args.queue)
    uvicorn.run(make_app(worker, name, args.api_key), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
