"""Decoding with a preallocated KV cache, batched over prompts of different lengths: greedy, or sampled per row.

    new_tokens = slm.generate(model, [tok.encode("Hello"), tok.encode("A longer prompt")], max_new_tokens=32)
    new_tokens = slm.generate(model, prompts, max_new_tokens=32, compile=True)   # the decode step compiled

Prompts are left-padded with the pad id into one (B, P) batch; the attention mask marks the real
tokens, and OPT derives its positions from that mask, so a padded prompt decodes exactly as it would
alone. One prefill forward fills the cache (through the model's `attn` switch, e.g. our Triton
kernel), then one single-token step per new token writes to it. The cache holds P + max_new_tokens
positions from the start: nothing is allocated or copied per step.

Static shapes (gpt-fast's decoding): every step attends to the whole cache under a (B, 1, 1, max_len)
mask of the written, real positions, writes its keys and values at a tensor index, and gets its
position from a tensor, so nothing in a step changes shape or is a Python number that changes
(`KVCache`). On a GPU decoding is launch-bound (a few hundred small kernels per token), so
`compile=True` compiles that step with `torch.compile`: on CUDA in mode "reduce-overhead", which
replays it as one CUDA graph per token; on the CPU into C++ kernels, without graphs, which on our
shared 2-core machine was slower than eager (`bench/decode.py --small --compile`): it is there so the
path runs and is tested everywhere, and meant for CUDA. The first call per model and shape pays the
compile (a minute on that CPU). compile=False runs the same step eagerly; both give the same tokens.

Returned tokens: the new tokens of each prompt, up to and *including* the first `eos_id` (as
transformers' `generate()` does, so a caller can tell "stopped at </s>" from "hit the limit"), or
`max_new_tokens` tokens when no eos came.

Constrained decoding: `constraints` gives one `slm.step_grammar` matcher (or None) per prompt. Such a
call takes its own loop on the host: every step's logits come to the host, each row with a matcher is
masked to what its grammar allows before the argmax, and the matcher advances with the chosen token.
Sampling (`samplers`, one `Sampler` or None per prompt), a per-token callback (`on_token`, e.g. a server
streaming each row) and stopping rows midway (`cancelled`) take that loop too. Calls with none of these
run the loop below unchanged.

Sampling draws from softmax(logits / temperature), cut to the top_p nucleus (transformers' `top_p`), with
the row's own `torch.Generator`: a row draws once per token it keeps, so a seeded row gives the same tokens
alone or beside any other rows. A row without a Sampler is greedy, the argmax of the same (masked) logits.

Host syncs: the loop never reads a tensor value on the host except a cheap "have all sequences
finished?" check every `check_every` steps; the tokens come back to the host once, at the end.
Sequences that finished keep decoding until that check (their extra tokens are discarded), which
costs a few wasted steps but saves a GPU->CPU round trip per token.
"""

import functools
from dataclasses import dataclass

import torch

from . import step_grammar
from .model import OPT, KVCache

# compile=True rounds the cache length up to a multiple of this, so calls whose prompts differ a little
# in length share one compiled step (and one CUDA graph) instead of one each; the extra positions are
# never written, and masked.
CAPTURE_LENGTH_MULTIPLE = 128


def decode_step(model: OPT, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
    """One greedy step at static shapes: token (B,) at cache column position (1,) -> next token (B,).

    mask (B, max_len) marks the real tokens of the whole run (prompt pads 0, everything else 1).
    """
    logits = model(token[:, None], attention_mask=mask, cache=cache, cache_position=position)  # (B, 1, vocab)
    return logits[:, -1].argmax(dim=-1)


@functools.cache
def compiled_decode_step(device_type: str):
    """`decode_step` through torch.compile, CUDA graphs on CUDA; compiled on first call, then cached."""
    mode = "reduce-overhead" if device_type == "cuda" else "default"   # CUDA graphs exist on CUDA only
    return torch.compile(decode_step, mode=mode, fullgraph=True)


@dataclass(frozen=True)
class Sampler:
    """How one row samples: softmax(logits / temperature) cut to the top_p nucleus, drawn with `generator`
    (None: torch's global generator). temperature > 0; top_p in [0, 1], 1 keeps every token."""
    temperature: float
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> int:
        """A token id drawn from one row's (vocab,) float logits on the CPU (masked ones at -inf)."""
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # The nucleus: a token stays while the mass of the likelier ones is under top_p; the likeliest always.
            outside = sorted_probs.cumsum(0) - sorted_probs >= self.top_p
            outside[0] = False
            probs[order[outside]] = 0
        return int(torch.multinomial(probs, 1, generator=self.generator))


@torch.inference_mode()
def generate(
    model: OPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int | None = 2,
    compile: bool = False,
    *,
    pad_id: int | None = None,
    check_every: int = 8,
    constraints: list | None = None,
    samplers: list[Sampler | None] | None = None,
    on_token=None,
    cancelled=None,
) -> list[list[int]]:
    """Greedy (or sampled) continuation of every prompt; new tokens only, each list ending at its first eos_id.

    The model should be in eval mode (as `slm.load_model` returns it): dropout would make decoding random.
    prompts: token-id lists (each non-empty, e.g. `tok.encode(text)` with its leading </s>).
    max_new_tokens: the most tokens generated per prompt.
    eos_id: generation of a sequence stops after this token; None never stops early (benchmarks).
    compile: decode with the compiled step (CUDA graphs on CUDA); the same tokens as without.
    pad_id: the id left padding uses (default: the model's pad_token_id). Padded positions are masked
        out, so the id only has to be a valid one.
    check_every: how many steps pass between checks that every sequence has finished.
    constraints: one `slm.step_grammar` matcher or None per prompt (see the module docstring); the
        matchers are advanced in place. With any matcher, compile is not used.
    samplers: one `Sampler` or None (greedy) per prompt. Any Sampler takes the host loop.
    on_token: a callable `on_token(row, token)`, called for every token a row keeps, as it is chosen (after
        its matcher advanced). Host loop.
    cancelled: a callable, called once per step with no arguments, returning the set of row indexes to
        stop now (a server's disconnected clients); those rows keep the tokens they have. Host loop.
    """
    if not prompts:
        return []
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty[:10]} are empty: every prompt needs at least one token (the BOS)")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    config = model.config
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{config.max_position_embeddings} positions: shorten the prompts or ask for fewer tokens")

    device = model.lm_head_weight.device
    pad_id = config.pad_token_id if pad_id is None else pad_id
    batch, total = len(prompts), longest + max_new_tokens
    if compile:
        total = -(-total // CAPTURE_LENGTH_MULTIPLE) * CAPTURE_LENGTH_MULTIPLE

    # Left padding: every prompt ends at column `longest`, so the new tokens of all sequences share
    # one column per step. The mask is allocated for the whole run; its new-token columns are all 1
    # (a finished sequence still attends to its own later tokens, which are discarded anyway).
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    mask = torch.ones((batch, total), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, :longest - len(prompt)] = 0
    input_ids, mask = input_ids.to(device), mask.to(device)

    cache = model.new_kv_cache(batch, total)
    host_loop = (constraints is not None and any(c is not None for c in constraints)) or cancelled is not None \
        or on_token is not None or (samplers is not None and any(s is not None for s in samplers))
    if host_loop:
        constraints = constraints if constraints is not None else [None] * batch
        samplers = samplers if samplers is not None else [None] * batch
        if len(constraints) != batch:
            raise ValueError(f"{len(constraints)} constraints for {batch} prompts: give one matcher or None each")
        if len(samplers) != batch:
            raise ValueError(f"{len(samplers)} samplers for {batch} prompts: give one Sampler or None each")
        return _generate_on_host(model, input_ids, mask, cache, max_new_tokens, eos_id, constraints, samplers,
                                 on_token, cancelled)
    step_fn = decode_step
    if compile:
        step_fn = compiled_decode_step(device.type)
        # The step writes the cache in place: a CUDA graph may do so only to tensors at fixed addresses.
        torch._dynamo.mark_static_address(cache.k)
        torch._dynamo.mark_static_address(cache.v)
    out = torch.empty((batch, max_new_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    # Prefill: only the last position's logits are needed, so project just that hidden state onto the
    # vocabulary instead of materialising (B, P, vocab) logits.
    hidden = model(input_ids, attention_mask=mask[:, :longest], cache=cache, return_hidden=True)
    next_token = (hidden[:, -1] @ model.lm_head_weight.T).argmax(dim=-1)     # (B,)
    position = torch.full((1,), longest, dtype=torch.long, device=device)     # the next token's column
    steps = max_new_tokens
    for step in range(max_new_tokens):
        out[:, step] = next_token
        if eos_id is not None:
            finished |= next_token == eos_id
            if (step + 1) % check_every == 0 and bool(finished.all()):   # the loop's only host sync
                steps = step + 1
                break
        if step + 1 == max_new_tokens:
            break
        # A clone: a CUDA graph's output lives in memory that its next replay overwrites.
        next_token = step_fn(model, next_token, mask, position, cache).clone()   # (B,)
        position += 1

    tokens = out[:, :steps].tolist()
    if eos_id is not None:
        tokens = [seq[:seq.index(eos_id) + 1] if eos_id in seq else seq for seq in tokens]
    return tokens


def _generate_on_host(model: OPT, input_ids, mask, cache, max_new_tokens: int, eos_id, matchers, samplers,
                      on_token=None, cancelled=None) -> list[list[int]]:
    """Decoding of a prepared batch on the host: each row with a matcher masked by its grammar, rows with a
    Sampler sampled, every kept token passed to `on_token`, rows that `cancelled` names stopped."""
    longest = input_ids.shape[1]
    hidden = model(input_ids, attention_mask=mask[:, :longest], cache=cache, return_hidden=True)
    logits = (hidden[:, -1] @ model.lm_head_weight.T).float().cpu()     # (B, vocab)
    position = torch.full((1,), longest, dtype=torch.long, device=input_ids.device)
    rows: list[list[int]] = [[] for _ in matchers]
    finished = [False] * len(matchers)
    for step in range(max_new_tokens):
        for i in cancelled() if cancelled is not None else ():
            finished[i] = True
        if all(finished):
            break
        # Finished rows are neither masked nor sampled: a row's generator draws only for its own tokens.
        step_grammar.mask_logits(logits, [None if done else m for m, done in zip(matchers, finished)])
        next_token = logits.argmax(dim=-1)
        for i, sampler in enumerate(samplers):
            if sampler is not None and not finished[i]:
                next_token[i] = sampler(logits[i])
        for i, token in enumerate(next_token.tolist()):
            if finished[i]:
                continue
            rows[i].append(token)
            if matchers[i] is not None:
                matchers[i].advance(token)
            finished[i] = eos_id is not None and token == eos_id
            if on_token is not None:
                on_token(i, token)
        if all(finished) or step + 1 == max_new_tokens:
            break
        out = model(next_token[:, None].to(input_ids.device), attention_mask=mask, cache=cache,
                    cache_position=position)
        logits = out[:, -1].float().cpu()
        position += 1
    return rows
