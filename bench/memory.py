"""Peak memory of one training step, read before renting a GPU.

    PYTHONPATH=. python bench/memory.py --model opt-350m --batch-size 8 --seq-len 2048
    PYTHONPATH=. python bench/memory.py --kernels attention=triton,linear_cross_entropy=triton \\
        --activation-checkpointing --lm --json memory.json
    PYTHONPATH=. python bench/memory.py --table     # every combination of the paper recipe, markdown

The budget of one step of train.py (fp32 master weights, autocast in --dtype, AdamW):
    weights, gradients          4 bytes per parameter each
    optimizer                   AdamW's two fp32 moments: 2 x 4 bytes per parameter
    weight copies               autocast's half-precision copy of every matmul weight, alive from its first
                                use in forward until backward has used it (counted from what autograd saves)
    activations                 what autograd saves for backward in each decoder layer, x layers x rows;
                                with --activation-checkpointing only each layer's input is kept
    loss                        what the loss saves: the fp32 log-probabilities of the materialised logits
                                (linear_cross_entropy=torch), or the fused kernel's own (=triton), for every
                                token (--lm, the LM warm-up) or the trained ones (--trained-fraction)
    transient                   the largest thing alive on top for a moment: the logits' gradients in
                                fp32 and half precision (materialised: tokens x vocab x 6 bytes), or one
                                layer's gradients (about its saved activations), plus with checkpointing the
                                layer being recomputed
    peak                        weights + gradients + optimizer + copies + activations + loss + transient

How: the bytes saved for backward are counted by torch.autograd.graph.saved_tensors_hooks (each storage
once; parameters and their autocast copies told apart by their autograd node), while the model runs
forward with the chosen kernels on --measure-len tokens (default 256 on a CPU, where a half-precision step
at full length takes minutes) at the real width: once with 1 and once with 2 decoder layers, whose
difference is one layer. Saved bytes grow linearly with the tokens for every implementation but "eager"
attention (which saves T x T scores), so per-layer and loss bytes are scaled by tokens / measured tokens;
the loss is measured on 64 and 128 tokens and extrapolated along that line (the fused kernel keeps a
fixed (V, E) weight gradient). On CUDA the script also runs the real step (two, so AdamW's state
exists) and prints torch.cuda.max_memory_allocated beside the estimate. The CUDA context and the
allocator's fragmentation are not included. From Python: `run(parse_args([...]))` returns what --json writes.
"""

import argparse
import json
import math
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for slm and bench
from bench import harness  # noqa: E402

harness.interpret_without_gpu()

import slm  # noqa: E402
from slm import kernels  # noqa: E402

GIB = 2**30
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LOSS_TOKENS = 64   # the loss is measured on this many tokens and twice as many, then extrapolated


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="opt-350m", help="an OPTConfig preset (default opt-350m)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    kernels.add_arguments(p, "the model's defaults (attention sdpa, the rest torch)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in backward")
    p.add_argument("--lm", action="store_true", help="LM warm-up: the loss covers every token")
    p.add_argument("--trained-fraction", type=float, default=0.1,
                   help="share of tokens with a trained target when not --lm (ToolBench: under 10%%)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="autocast precision (default fp16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    p.add_argument("--measure-len", type=int, help="tokens run per measurement (default: --seq-len on "
                                                    "CUDA, 256 on a CPU)")
    p.add_argument("--gpu-gib", type=float, default=22.0, help="memory a process gets (default 22, a 24 GB card)")
    p.add_argument("--table", action="store_true", help="every attention x checkpointing x loss combination")
    p.add_argument("--json", type=Path, help="write the budget (with a top-level peak_gib) here")
    args = p.parse_args(argv)
    args.kernels = args.kernels or {}
    if args.measure_len is None:
        args.measure_len = args.seq_len if args.device == "cuda" else min(256, args.seq_len)
    return args


# ---------------------------------------------------------------------------------- saved tensors

COPY_NODES = {"ToCopyBackward0", "TBackward0", "TransposeBackward0", "ViewBackward0", "PermuteBackward0"}


def derived_from_a_parameter(node, depth: int = 4) -> bool:
    """Whether an autograd node is a chain of casts and transposes over a parameter alone: autocast's
    half-precision weight copies, which do not grow with the tokens (an embedding's output does)."""
    if type(node).__name__ == "AccumulateGrad":
        return True
    inputs = [n for n, _ in node.next_functions if n is not None]
    return (depth > 0 and type(node).__name__ in COPY_NODES and len(inputs) == 1
            and derived_from_a_parameter(inputs[0], depth - 1))


class SavedBytes:
    """Counts, by storage, the tensors autograd saves while active: activations, and the half-precision
    copies autocast makes of parameters; the parameters themselves are counted elsewhere."""

    def __init__(self, model: torch.nn.Module):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.activations, self.weight_copies = {}, {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.parameters:
            return t
        is_copy = t.grad_fn is not None and derived_from_a_parameter(t.grad_fn)
        (self.weight_copies if is_copy else self.activations)[key] = storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def keep_layer_inputs(self, model):
        """With checkpointing a layer saves nothing through autograd but keeps its input: count that."""
        def pre_hook(module, args):
            self.activations[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()
        return [layer.register_forward_pre_hook(pre_hook) for layer in model.layers]


def autocast(args):
    enabled = args.dtype != "fp32"
    return torch.autocast(args.device, dtype=DTYPES[args.dtype]) if enabled else nullcontext()


def build_model(args, layers: int, checkpointing: bool) -> slm.OPT:
    config = replace(slm.OPTConfig.preset(args.model), num_hidden_layers=layers)
    torch.manual_seed(0)
    model = slm.OPT(config, kernels=args.kernels, activation_checkpointing=checkpointing)
    return model.to(args.device).train()   # dropout on, as in training: its masks are saved too


def measure_decoder(args, layers: int, checkpointing: bool) -> SavedBytes:
    """Bytes saved by the model's forward (embedding and decoder, no head) on one packed row."""
    model = build_model(args, layers, checkpointing)
    tokens = args.measure_len
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), device=args.device)
    cu_seqlens = torch.tensor([0, tokens], dtype=torch.int32, device=args.device)
    saved = SavedBytes(model)
    handles = saved.keep_layer_inputs(model) if checkpointing else []
    with autocast(args), saved.hooks():
        model(ids, cu_seqlens=cu_seqlens, max_seqlen=tokens, return_hidden=True)
    for handle in handles:
        handle.remove()
    return saved


def measure_loss(args, model: slm.OPT, tokens: int) -> SavedBytes:
    """Bytes the loss saves for `tokens` tokens: the model's linear_cross_entropy on its tied head."""
    width = model.config.word_embed_proj_dim
    hidden = torch.randn(tokens, width, device=args.device, dtype=DTYPES[args.dtype], requires_grad=True)
    targets = torch.randint(model.config.vocab_size, (tokens,), device=args.device)
    saved = SavedBytes(model)
    with autocast(args), saved.hooks():
        model.kernel("linear_cross_entropy")(hidden, model.lm_head_weight, targets, reduction="sum")
    saved.activations.pop(hidden.untyped_storage().data_ptr(), None)   # the decoder's output, counted there
    return saved


# ------------------------------------------------------------------------------------------ budget

def budget(args, checkpointing: bool) -> dict:
    """The step's memory by part, in GiB, estimated from saved tensors (see the module docstring)."""
    one, two = measure_decoder(args, 1, checkpointing=False), measure_decoder(args, 2, checkpointing=False)
    per_layer = sum(two.activations.values()) - sum(one.activations.values())        # bytes, measured tokens
    stored_per_layer = per_layer
    if checkpointing:
        one_c, two_c = measure_decoder(args, 1, True), measure_decoder(args, 2, True)
        stored_per_layer = sum(two_c.activations.values()) - sum(one_c.activations.values())
    rest = sum(one.activations.values()) - per_layer                                   # embedding etc.

    model = build_model(args, 1, False)
    config = slm.OPTConfig.preset(args.model)
    params = sum(p.numel() for p in model.parameters()) + \
        (config.num_hidden_layers - 1) * sum(p.numel() for p in model.layers[0].parameters())
    # Copies: measured for one layer and the embedding/head; a two-layer model's extra layer gives the rest.
    # All are counted, checkpointing or not: autocast's cache keeps every copy until its region (forward
    # and loss, in train.py) ends, when the saved activations are all alive.
    copies_one_layer = sum(two.weight_copies.values()) - sum(one.weight_copies.values())
    # The loss at two token counts: saved bytes = fixed + per token (the fused kernel keeps a (V, E) fp32
    # weight gradient whatever the tokens; the materialised logits grow with them).
    loss_small, loss_large = measure_loss(args, model, LOSS_TOKENS), measure_loss(args, model, 2 * LOSS_TOKENS)
    loss_per_token = (sum(loss_large.activations.values()) - sum(loss_small.activations.values())) / LOSS_TOKENS
    loss_fixed = sum(loss_small.activations.values()) - loss_per_token * LOSS_TOKENS
    copies = (sum(one.weight_copies.values()) + sum(loss_small.weight_copies.values())
              + (config.num_hidden_layers - 1) * copies_one_layer)

    tokens = args.batch_size * args.seq_len
    scale = tokens / args.measure_len
    loss_tokens = tokens if args.lm else round(tokens * args.trained_fraction)
    materialised = args.kernels.get("linear_cross_entropy", "torch") == "torch"
    layer_activations = per_layer * scale
    parts = {
        "weights": 4 * params,
        "gradients": 4 * params,
        "optimizer": 8 * params,
        "weight_copies": copies,
        "activations": config.num_hidden_layers * stored_per_layer * scale + rest * scale,
        "loss": loss_fixed + loss_per_token * loss_tokens,
        # fp32 and half-precision gradients of the logits (6 bytes a logit), or one layer's gradients
        # (about its saved activations) plus, with checkpointing, the layer being recomputed.
        "transient": max(loss_tokens * config.vocab_size * 6 if materialised else 0,
                         layer_activations * (2 if checkpointing else 1)),
    }
    gib = {name: value / GIB for name, value in parts.items()}
    return {
        "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype,
        "kernels": model.kernels, "activation_checkpointing": checkpointing, "lm": args.lm,
        "loss_tokens": loss_tokens, "parameters": params, "measured_tokens": args.measure_len,
        "device": args.device,
        "activations_per_layer_per_row_mib": stored_per_layer * args.seq_len / args.measure_len / 2**20,
        "parts_gib": gib, "peak_gib": sum(gib.values()),
        "largest_batch": largest_batch(gib, args),
    }


def largest_batch(gib: dict, args) -> int:
    """Rows per step that fit in --gpu-gib: everything but weights, gradients, optimizer and copies grows
    linearly with the rows."""
    fixed = gib["weights"] + gib["gradients"] + gib["optimizer"] + gib["weight_copies"]
    per_row = (gib["activations"] + gib["loss"] + gib["transient"]) / args.batch_size
    return max(0, math.floor((args.gpu_gib - fixed) / per_row))


def cuda_peak_gib(args, checkpointing: bool) -> float:
    """torch.cuda.max_memory_allocated over two real steps of the same recipe (the second has AdamW state)."""
    model = build_model(args, slm.OPTConfig.preset(args.model).num_hidden_layers, checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens = args.batch_size * args.seq_len
    ids = torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    lengths = [args.seq_len] * args.batch_size
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    loss_tokens = tokens if args.lm else round(tokens * args.trained_fraction)
    positions = torch.randperm(tokens, device="cuda")[:loss_tokens]
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with autocast(args):
            hidden = model(ids, cu_seqlens=cu_seqlens, max_seqlen=args.seq_len, return_hidden=True)
            h = hidden.flatten(0, 1).index_select(0, positions)
            loss = model.kernel("linear_cross_entropy")(h, model.lm_head_weight, ids.flatten()[positions])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() / GIB


def report(result: dict, measured_peak: float | None, gpu_gib: float) -> None:
    k = ",".join(f"{op}={name}" for op, name in result["kernels"].items())
    print(f"{result['model']}, {result['batch_size']} x {result['seq_len']}, {result['dtype']}, {k}, "
          f"checkpointing {'on' if result['activation_checkpointing'] else 'off'}, "
          f"loss over {'every token (LM)' if result['lm'] else 'trained tokens'} ({result['loss_tokens']:,})")
    for name, value in result["parts_gib"].items():
        print(f"  {name:<14} {value:7.2f} GiB")
    print(f"  {'peak':<14} {result['peak_gib']:7.2f} GiB   (estimated from saved tensors on {result['device']}, "
          f"{result['measured_tokens']} tokens measured, scaled)")
    if measured_peak is not None:
        print(f"  {'cuda peak':<14} {measured_peak:7.2f} GiB   (torch.cuda.max_memory_allocated, the real step)")
    print(f"  activations per layer per row: {result['activations_per_layer_per_row_mib']:.1f} MiB; "
          f"largest batch in {gpu_gib:g} GiB: {result['largest_batch']}")


COMBINATIONS = [(attention, checkpointing, lm, loss) for attention in ("sdpa", "triton") for checkpointing in (False, True)
                for lm, loss in ((False, "torch"), (True, "torch"), (True, "triton"))]


def run(args) -> dict:
    """The budget of `parse_args`'s recipe, with "cuda_peak_gib" (the real step's peak on CUDA, else None);
    with args.table {"rows": the budget of every combination in COMBINATIONS, "peak_gib": the largest}."""
    if not args.table:
        result = budget(args, args.activation_checkpointing)
        result["cuda_peak_gib"] = cuda_peak_gib(args, args.activation_checkpointing) if args.device == "cuda" else None
        return result
    rows = []
    for attention, checkpointing, lm, loss in COMBINATIONS:   # the paper recipe's attention x checkpointing x loss
        args.kernels, args.lm = {"attention": attention, "linear_cross_entropy": loss}, lm
        rows.append(budget(args, checkpointing))
    return {"rows": rows, "peak_gib": max(r["peak_gib"] for r in rows)}


def print_table(rows: list[dict], gpu_gib: float) -> None:
    print(f"\n| attention | checkpointing | loss | peak GiB | activations / layer / row | largest batch in "
          f"{gpu_gib:g} GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        loss = ("LM, fused linear-CE" if r["kernels"]["linear_cross_entropy"] != "torch" else "LM, full fp32 logits") \
            if r["lm"] else "trained turns"
        print(f"| {r['kernels']['attention']} | {'on' if r['activation_checkpointing'] else 'off'} | {loss} | "
              f"{r['peak_gib']:.1f} | {r['activations_per_layer_per_row_mib']:.1f} MiB | {r['largest_batch']} |")


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    if args.table:
        print_table(result["rows"], args.gpu_gib)
    else:
        report(result, result["cuda_peak_gib"], args.gpu_gib)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
