"""OPT, the decoder-only transformer of Zhang et al. 2022, written from scratch to compute exactly what
Hugging Face's `OPTForCausalLM` computes.

    model = OPT(OPTConfig.preset("opt-350m"), attn="sdpa")
    logits = model(input_ids, attention_mask)                  # (B, T) -> (B, T, vocab)
    logits = model(input_ids, cu_seqlens=cu, max_seqlen=m)     # packed sequences (training)
    logits = model(new_ids, attention_mask=mask, cache=cache)  # decoding with a KV cache

The OPT quirks (see docs/OPT.md): learned positions offset by 2 and computed from the attention mask
(so left padding gives the first real token position 0); queries scaled after their bias; post-LN for
opt-350m, pre-LN for the others; a 512-wide embedding projected to 1024 in opt-350m; the LM head tied
to the token embedding. Attention and LayerNorm run through the kernel registry (`kernels/`), chosen by
name per op, so a kernel is swapped without editing this file:

    model = OPT(config, kernels={"attention": "triton", "layer_norm": "triton"})   # attn="triton" also works

Attention is called in one of three forms (kernels/attention.py): packed training rows as (B*T, H, D)
with cu_seqlens; unpadded rows dense and causal; padded prefill and decode steps dense with a mask.
`activation_checkpointing=True` recomputes each decoder layer in backward instead of saving its activations.

Module names are ours; `slm/weights.py` maps them to Hugging Face's key names in both directions.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import registry

from .config import OPTConfig

# Each op's implementation unless `kernels=` names another ("attention" defaults to `attn`).
DEFAULT_KERNELS = {"attention": "sdpa", "layer_norm": "torch", "linear_cross_entropy": "torch"}
ATTENTION_IMPLEMENTATIONS = tuple(registry.available()["attention"])   # the shipped ones: flags' choices
POSITION_OFFSET = 2  # OPT's learned position table starts its real positions at row 2 (pads use row 1)


def sinusoidal_table(rows: int, width: int, rms: float) -> torch.Tensor:
    """Position-table rows of sin/cos waves (Vaswani et al. 2017), scaled to `rms`; row r is position
    r - POSITION_OFFSET, so position 0 sits where OPT looks it up.

    Why: random rows make "the token one step back" a different direction at every position, so a
    head that attends to the previous token (half of the circuit that copies a name from the context)
    must be learned position by position. Here one step back is the same rotation at every position
    (each sin/cos pair at frequency w turns by w), one linear map that all positions train together.
    """
    position = torch.arange(rows, dtype=torch.float64)[:, None] - POSITION_OFFSET
    frequency = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float64) / width)
    table = torch.zeros(rows, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return (table * rms * math.sqrt(2.0)).float()   # a unit wave's RMS is 1/sqrt(2)


def fit_offset_heads(model: "OPT", offsets, generator: torch.Generator | None = None, steps: int = 150,
                     window: int = 128, batch: int = 4, lr: float = 0.03) -> None:
    """Fit the query and key weights of the first len(offsets) heads of layer 0 so that head h attends
    offsets[h] tokens back. Values, outputs and every other weight keep their random start.

    Why: copying a name from the context is an induction circuit, whose first half is a head that
    reads the previous token, or one a few tokens back (in `city_population_for_<tool>` the words
    before `for_` say which tool follows). From random init a tiny model takes most of a CPU budget to
    find such heads; started from them, it copies within a few hundred steps (BENCHMARKS.md). They
    stay trainable.
    How: where a head looks is decided by the position table, so Adam fits its q and k rows to put the
    softmax on the target offset, over random windows of the table plus random token embeddings, as
    layer 0 sees them (after its LayerNorm in a pre-LN model, whose mean subtraction rules out writing
    the rotation between positions down by hand).
    """
    layer, c = model.layers[0], model.config
    if not offsets or len(offsets) > c.num_attention_heads or min(offsets) < 1:
        raise ValueError(f"offset_heads {tuple(offsets)}: expected 1 to {c.num_attention_heads} offsets >= 1")
    heads, width, d = len(offsets), len(offsets) * c.head_dim, c.hidden_size
    rows = (slice(0, width), slice(d, d + width))   # those heads' q and k rows of the fused qkv projection
    window = min(window, c.max_position_embeddings)
    t = torch.arange(window)
    allowed = t[None, :] <= t[:, None]                                # causal (T, T)
    targets = torch.stack([t - d for d in offsets])                   # (heads, T): the key to attend
    trained = targets >= 0                                            # queries whose key is in the window

    def layer_input():
        """Layer 0's attention input for a random window of tokens and positions: (batch, T, d)."""
        start = int(torch.randint(c.max_position_embeddings - window + 1, (1,), generator=generator))
        ids = torch.randint(c.pad_token_id + 1, c.vocab_size, (batch, window), generator=generator)
        with torch.no_grad():
            x = model.embed(ids, (start + t).expand(batch, window))
            return layer.attn_norm(x) if layer.pre_ln else x

    # Fit in units where the input has RMS 1 (a post-LN layer 0 sees the raw, small embeddings), so one
    # learning rate serves both layouts; the scale goes back into the weights at the end.
    scale = layer_input().pow(2).mean().sqrt()
    qkv = layer.attn.qkv
    wq, wk = ((qkv.weight[r] * scale).detach().requires_grad_(True) for r in rows)
    bq, bk = (qkv.bias[r].detach() if qkv.bias is not None else 0.0 for r in rows)
    optimizer = torch.optim.Adam([wq, wk], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            x = layer_input() / scale
            q, k = ((y.view(batch, window, heads, c.head_dim).transpose(1, 2))       # (B, heads, T, hd)
                    for y in ((x @ wq.T + bq) * layer.attn.scale, x @ wk.T + bk))
            scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))  # (B, heads, T, T)
            loss = F.cross_entropy(scores[:, trained].flatten(0, 1), targets[trained].repeat(batch))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        qkv.weight[rows[0]] = wq / scale
        qkv.weight[rows[1]] = wk / scale


# ---------------------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values for every layer: (layers, B, H, max_len, head_dim) each.

    `length` is the number of positions already written; a forward with a cache appends its new
    tokens there and advances it. `mask` is the attention mask of everything written so far.
    """

    def __init__(self, config: OPTConfig, batch_size: int, max_len: int, dtype, device):
        shape = (config.num_hidden_layers, batch_size, config.num_attention_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, H, T_new, D) for `layer`; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ------------------------------------------------------------------------------- attention masks

@dataclass
class AttentionLayout:
    """How the tokens of one forward may attend, computed once and shared by every layer: the attention
    op's keyword arguments (kernels/attention.py) besides q, k, v.

    Packed rows: `cu_seqlens` over the flattened B*T tokens and `max_seqlen`. Otherwise `mask`, a boolean
    (B, 1, T, past+T), or None when every row is one whole sequence (plain causal attention).
    """
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None


def _padded_allowed(attention_mask: torch.Tensor, past: int, t_new: int) -> torch.Tensor:
    """Causal AND key-is-real, for new queries at positions past..past+T-1 of a (B, S) mask.

    Each query may also see itself: a pad query (left padding) then has one visible key instead of
    none, which keeps its softmax finite. Real queries are unaffected (they always see themselves),
    and nothing real ever attends to a pad, so the pad rows' values never leak.
    """
    s = attention_mask.shape[1]
    q_pos = torch.arange(past, past + t_new, device=attention_mask.device)[:, None]
    k_pos = torch.arange(s, device=attention_mask.device)[None, :]
    causal = k_pos <= q_pos                                   # (T, S)
    key_real = attention_mask.bool()[:, None, None, :]        # (B, 1, 1, S)
    return causal & (key_real | (k_pos == q_pos))             # (B, 1, T, S)


def _packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each token's position within its packed sequence, (total,), for cu_seqlens over `total` tokens."""
    flat = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.long)
    sequence = torch.searchsorted(cu[1:], flat, right=True)   # (total,) index of each token's sequence
    return flat - cu[sequence]


# ------------------------------------------------------------------------------------ the blocks

class Attention(nn.Module):
    """Multi-head self-attention: one fused q/k/v projection, the attention op, the output projection."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        d, bias = config.hidden_size, config.enable_bias
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        self.dropout = config.attention_dropout
        # Rows [0, d) are q, [d, 2d) k, [2d, 3d) v: one GEMM that reads (and saves for backward) x once.
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)

    def forward(self, x, layout: AttentionLayout, attention, cache: KVCache | None, layer: int):
        B, T, d = x.shape
        H, D = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, D).unbind(2)      # (B, T, H, D) views each
        # OPT scales q after its bias (HF does the same); equal to scaling the scores, kept for parity.
        q = q * self.scale
        dropout = self.dropout if self.training else 0.0
        if layout.cu_seqlens is not None:                         # packed rows: (B*T, H, D), no copies
            y = attention(q.view(B * T, H, D), k.reshape(B * T, H, D), v.reshape(B * T, H, D), scale=1.0,
                          cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen, dropout_p=dropout)
            return self.o(y.view(B, T, d))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # (B, H, T, D)
        if cache is not None:
            k_all, v_all = cache.write(layer, k, v)               # (B, H, past+T, D)
            if cache.length > 0:
                k, v = k_all, v_all                               # decoding: attend to the cache too
        y = attention(q, k, v, causal=layout.mask is None, scale=1.0, mask=layout.mask,
                      dropout_p=dropout)                          # (B, H, T, D); q is already scaled
        return self.o(y.transpose(1, 2).reshape(B, T, d))         # (B, T, H*D)


def _norm(layer_norm, norm: nn.LayerNorm, x, residual=None):
    """The layer_norm op with an nn.LayerNorm's parameters: LayerNorm(x + residual)."""
    return layer_norm(x, norm.weight, norm.bias, norm.eps, residual)


class DecoderLayer(nn.Module):
    """Attention then a ReLU MLP, each in a residual branch; LayerNorm before (pre-LN) or after (post-LN)."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        affine = config.layer_norm_elementwise_affine
        self.pre_ln = config.do_layer_norm_before
        self.dropout = config.dropout
        self.attn = Attention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)

    def forward(self, x, layout, ops, cache, layer):
        """ops: {"attention": fn, "layer_norm": fn} from the registry (OPT.forward resolves them)."""
        attention, layer_norm = ops["attention"], ops["layer_norm"]
        if self.pre_ln:
            h = self.attn(_norm(layer_norm, self.attn_norm, x), layout, attention, cache, layer)
            x = x + F.dropout(h, self.dropout, self.training)
            h = self.fc2(F.relu(self.fc1(_norm(layer_norm, self.ffn_norm, x))))
            return x + F.dropout(h, self.dropout, self.training)
        # Post-LN: norm(x + sublayer(x)), the residual add fused into the norm op.
        h = self.attn(x, layout, attention, cache, layer)
        x = _norm(layer_norm, self.attn_norm, x, F.dropout(h, self.dropout, self.training))
        h = self.fc2(F.relu(self.fc1(x)))
        return _norm(layer_norm, self.ffn_norm, x, F.dropout(h, self.dropout, self.training))


# ------------------------------------------------------------------------------------- the model

class OPT(nn.Module):
    """OPT with its tied language-model head.

    kernels: {op: name} from the registry (`kernels.available()`); unset ops take DEFAULT_KERNELS, with
    `attn` as the attention entry. activation_checkpointing: keep only each decoder layer's input for
    backward and recompute the layer there (dropout included), trading a forward's compute for memory.
    """

    def __init__(self, config: OPTConfig, attn: str = "sdpa", kernels: dict[str, str] | None = None,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.kernels = {**DEFAULT_KERNELS, "attention": attn, **(kernels or {})}
        for op, name in self.kernels.items():
            registry.get(op, name)        # an unknown op or name fails here, listing what exists
        self.activation_checkpointing = activation_checkpointing
        e, d = config.word_embed_proj_dim, config.hidden_size
        self.tok_embed = nn.Embedding(config.vocab_size, e, padding_idx=config.pad_token_id)
        self.pos_embed = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, d)
        self.project_in = nn.Linear(e, d, bias=False) if e != d else None
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = (nn.LayerNorm(d, elementwise_affine=config.layer_norm_elementwise_affine)
                           if config.has_final_layer_norm else None)
        self.project_out = nn.Linear(d, e, bias=False) if e != d else None

    def kernel(self, op: str):
        """The function this model runs for `op` (looked up now, so a re-registered name takes effect)."""
        if op not in self.kernels:
            raise ValueError(f"OPT.kernel: unknown op {op!r}; this model's kernels are {self.kernels}")
        return registry.get(op, self.kernels[op])

    def set_attn(self, attn: str) -> None:
        """Switch the attention implementation (a registered name) of a built model."""
        registry.get("attention", attn)
        self.kernels["attention"] = attn

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.tok_embed.weight  # tied: (vocab, word_embed_proj_dim)

    def init_weights(self, seed: int | None = None, sinusoidal_positions: float | None = None,
                     offset_heads: tuple[int, ...] = ()) -> None:
        """Random initialisation as OPT's: N(0, init_std) weights, zero biases, zero pad embedding.

        sinusoidal_positions: start the (still learned) position table from sine/cosine waves of this
        RMS instead (`sinusoidal_table`). A model trained from scratch on little data learns to copy
        names from its context far sooner with it (the smoke preset; BENCHMARKS.md has the runs).
        offset_heads: head h of the first layer starts out attending offset_heads[h] tokens back
        (`fit_offset_heads`); needs a position table that can express it, such as the sinusoidal one.
        """
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                    module.weight.fill_(1.0)
                    module.bias.zero_()
            self.tok_embed.weight[self.config.pad_token_id].zero_()
            if sinusoidal_positions is not None:
                rows, width = self.pos_embed.weight.shape
                self.pos_embed.weight.copy_(sinusoidal_table(rows, width, sinusoidal_positions))
        if offset_heads:
            fit_offset_heads(self, offset_heads, generator)

    def new_kv_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        weight = self.tok_embed.weight
        return KVCache(self.config, batch_size, max_len, dtype or weight.dtype, device or weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,                     # (B, T) token ids
        attention_mask: torch.Tensor | None = None,  # (B, past+T), 1 = real token
        *,
        position_ids: torch.Tensor | None = None,    # (B, T) positions, overriding the mask's
        cu_seqlens: torch.Tensor | None = None,      # (N+1,) int32 boundaries of packed sequences
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {past} used, {T} more asked")
        if cu_seqlens is not None:
            if attention_mask is not None or cache is not None:
                raise ValueError("packed sequences (cu_seqlens) take no attention_mask and no cache")
            cu_seqlens = cu_seqlens.to(torch.int32)
            positions = _packed_positions(cu_seqlens, B * T).view(B, T)
            layout = AttentionLayout(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen or T)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected {(B, past + T)} (past {past} + new {T})")
            # OPT's positions: count real tokens so far, so pads never shift a sequence (pads get -1).
            mask = attention_mask.long()
            positions = (torch.cumsum(mask, dim=1) * mask - 1)[:, past:]
            # Unpadded prefill is plain causal (decode steps skip the check: no host sync); else a mask.
            unpadded = past == 0 and bool(mask.all())
            layout = AttentionLayout(mask=None if unpadded else _padded_allowed(mask, past, T))
        if position_ids is not None:
            positions = position_ids

        ops = {op: self.kernel(op) for op in ("attention", "layer_norm")}
        x = self.embed(input_ids, positions)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Saves only x; backward reruns the layer (torch's non-reentrant mode, which stops the
                # rerun as soon as the tensors it needs exist) with the RNG state of the first run, so
                # the dropout masks, and with them the gradients, are the same.
                x = checkpoint(layer, x, layout, ops, cache, i, use_reentrant=False, preserve_rng_state=True)
            else:
                x = layer(x, layout, ops, cache, i)
        if cache is not None:
            cache.length += T
        if self.final_norm is not None:
            x = _norm(ops["layer_norm"], self.final_norm, x)
        if self.project_out is not None:
            x = self.project_out(x)                                      # (B, T, e)
        if return_hidden:
            return x
        return x @ self.lm_head_weight.T                                 # (B, T, vocab)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings: (B, T) ids and positions (0 = first real token) -> (B, T, d)."""
        x = self.tok_embed(input_ids)                                    # (B, T, e)
        if self.project_in is not None:
            x = self.project_in(x)                                       # (B, T, d)
        return x + self.pos_embed(positions + POSITION_OFFSET)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
