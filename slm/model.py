"""OPT, the decoder-only transformer of Zhang et al. 2022, written from scratch to compute exactly what
Hugging Face's `OPTForCausalLM` computes.

    model = OPT(OPTConfig.preset("opt-350m"), attn="sdpa")
    logits = model(input_ids, attention_mask)                  # (B, T) -> (B, T, vocab)
    logits = model(input_ids, cu_seqlens=cu, max_seqlen=m)     # packed sequences (training)
    logits = model(new_ids, attention_mask=mask, cache=cache)  # decoding with a KV cache
    logits = model(new_ids, attention_mask=full_mask, cache=cache, cache_position=pos)  # static shapes

The OPT quirks (see docs/OPT.md): learned positions offset by 2 and computed from the attention mask
(so left padding gives the first real token position 0); queries scaled after their bias; post-LN for
opt-350m, pre-LN for the others; a 512-wide embedding projected to 1024 in opt-350m; the LM head tied
to the token embedding. Attention is one of three interchangeable implementations, chosen by `attn`:
"eager" (plain torch, the reference), "sdpa" (torch's fused kernels) and "triton" (ours, `kernels/`).

Module names are ours; `slm/weights.py` maps them to Hugging Face's key names in both directions.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import OPTConfig

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "triton")
POSITION_OFFSET = 2  # OPT's learned position table starts its real positions at row 2 (pads use row 1)


# ---------------------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values for every layer: (layers, B, H, max_len, head_dim) each.

    A forward with a cache fills it in one of two ways:
    - growing (the prefill; step-by-step decoding with a (B, length + T) mask): its T new tokens go
      to positions length..length+T-1, it attends to everything written so far, and `length` (a host
      int) advances by T;
    - static (`OPT.forward(..., cache_position=...)`, the decode step of `slm.generate`): its tokens
      go to the tensor indices `position`, and it attends to all max_len positions under a mask of the
      written, real ones. No shape and no Python number changes from one step to the next, so the
      step can be captured (CUDA graphs, torch.compile). The caller keeps the position; `length` stays.
    """

    def __init__(self, config: OPTConfig, batch_size: int, max_len: int, dtype, device):
        shape = (config.num_hidden_layers, batch_size, config.num_attention_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.position = None   # the current forward's write indices (T,) when it is static; set by OPT.forward

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's k, v (B, H, T, D) for `layer`; return the keys and values it attends to."""
        if self.position is not None:                       # static: in place, at a tensor index
            self.k[layer].index_copy_(2, self.position, k)
            self.v[layer].index_copy_(2, self.position, v)
            return self.k[layer], self.v[layer]             # (B, H, max_len, D), masked by the caller
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        if start == 0:
            return k, v                                     # prefill: the new tokens are all there is
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]   # (B, H, end, D)


# ------------------------------------------------------------------------------- attention masks

@dataclass
class AttentionLayout:
    """How the tokens of one forward may attend, computed once and shared by every layer.

    Exactly one description applies: `causal_only` (every row is one whole sequence), `varlen`
    (sequences given by `cu_seqlens` over the real tokens `token_index` of the flattened batch, as the
    Triton kernel wants them), `segments` (packed rows as their sequences' lengths, for sdpa on CPU)
    or `allowed` (a boolean (B, 1, T_q, T_k) mask, what eager and sdpa use).
    """
    causal_only: bool = False
    allowed: torch.Tensor | None = None
    segments: list[list[int]] | None = None   # per row, the lengths of its packed sequences
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    token_index: torch.Tensor | None = None  # flat indices of real tokens; None when all are real


def _padded_allowed(attention_mask: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Causal AND key-is-real, for new queries at the columns q_pos (T,) of a (B, S) mask.

    Each query may also see itself: a pad query (left padding) then has one visible key instead of
    none, which keeps its softmax finite. Real queries are unaffected (they always see themselves),
    and nothing real ever attends to a pad, so the pad rows' values never leak.
    """
    q_pos = q_pos[:, None]                                    # (T, 1)
    k_pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]   # (1, S)
    causal = k_pos <= q_pos                                   # (T, S)
    key_real = attention_mask.bool()[:, None, None, :]        # (B, 1, 1, S)
    return causal & (key_real | (k_pos == q_pos))             # (B, 1, T, S)


def _packed_allowed(segment: torch.Tensor) -> torch.Tensor:
    """Causal AND same-sequence for packed rows; segment (B, T) holds each token's sequence number."""
    t = segment.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment.device).tril()
    same = segment[:, :, None] == segment[:, None, :]          # (B, T, T)
    return (causal & same)[:, None]                            # (B, 1, T, T)


def _row_lengths(cu_seqlens: torch.Tensor, batch: int, t: int) -> list[list[int]]:
    """The lengths of the packed sequences in each row of a (B, t) batch, checked to tile every row."""
    cu = cu_seqlens.tolist()
    rows = [[] for _ in range(batch)]
    for start, end in zip(cu[:-1], cu[1:]):
        row = start // t
        if end <= start or end > (row + 1) * t:
            rows = None
            break
        rows[row].append(end - start)
    if rows is None or cu[0] != 0 or cu[-1] != batch * t:
        raise ValueError(f"cu_seqlens {cu} must rise from 0 to {batch * t} (batch {batch} x {t} tokens) "
                         "without a sequence crossing a row")
    return rows


def _segments(cu_seqlens: torch.Tensor, batch: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence number and position within its sequence of every token of a packed (B, T) batch."""
    flat = torch.arange(batch * t, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.long)
    segment = torch.searchsorted(cu[1:], flat, right=True)    # (B*T,) index of each token's sequence
    position = flat - cu[segment]
    return segment.view(batch, t), position.view(batch, t)


# ------------------------------------------------------------------------------------ the blocks

class Attention(nn.Module):
    """Multi-head self-attention; the kernel that mixes q, k, v is picked by `attn` at call time."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        d, bias = config.hidden_size, config.enable_bias
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        self.dropout = config.attention_dropout
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)

    def forward(self, x, layout: AttentionLayout, attn: str, cache: KVCache | None, layer: int):
        B, T, d = x.shape
        # OPT scales q after its bias (HF does the same); equal to scaling the scores, kept for parity.
        q = self.q(x) * self.scale
        k, v = self.k(x), self.v(x)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.write(layer, k, v)                    # decoding: the cache too, (B, H, S, D)
        dropout = self.dropout if self.training else 0.0

        if attn == "triton" and layout.allowed is None:
            y = _triton_attention(q, k, v, layout)
        elif layout.segments is not None:
            y = _segmented_attention(q, k, v, layout.segments, dropout)
        elif attn == "eager":
            y = _eager_attention(q, k, v, layout, dropout)
        else:  # sdpa, and triton's decode steps (a masked query against the cache: sdpa serves it)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=layout.allowed, dropout_p=dropout,
                is_causal=layout.causal_only, scale=1.0,   # q is already scaled
            )
        y = y.transpose(1, 2).reshape(B, T, d)                 # (B, T, H*D)
        return self.o(y)


def _eager_attention(q, k, v, layout: AttentionLayout, dropout: float):
    """softmax(q kᵀ + mask) v in plain torch, softmax in fp32 as Hugging Face's eager path does."""
    scores = q @ k.transpose(-1, -2)                           # (B, H, T_q, T_k)
    allowed = layout.allowed
    if allowed is None:                                        # causal_only
        t_q, t_k = scores.shape[-2:]
        allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return probs @ v


def _segmented_attention(q, k, v, row_lengths: list[list[int]], dropout: float):
    """Packed rows as one causal sdpa call per sequence: what sdpa does with packed rows on CPU.

    Why: torch's CPU SDPA has a fast kernel for plain causal attention but not for a mask, and the
    work shrinks from T^2 per row to the sum of the squared sequence lengths (BENCHMARKS.md). Split,
    not sliced, so that the backward pass concatenates the gradients instead of zero-filling a
    full-size tensor per sequence; 4-D pieces, as 3-D ones take sdpa's slow path.
    """
    rows = []
    for qr, kr, vr, lengths in zip(q.split(1), k.split(1), v.split(1), row_lengths):
        pieces = zip(qr.split(lengths, dim=2), kr.split(lengths, dim=2), vr.split(lengths, dim=2))
        rows.append(torch.cat([F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True,
                                                              scale=1.0) for qs, ks, vs in pieces], dim=2))
    return torch.cat(rows)


def _triton_attention(q, k, v, layout: AttentionLayout):
    """Our fused kernel: dense when every row is one sequence, else varlen over the real tokens."""
    from kernels import flash_attention, flash_attention_varlen  # optional dependency: import on use

    if layout.causal_only:
        return flash_attention(q, k, v, causal=True, sm_scale=1.0)
    B, H, T, D = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v)]  # (B*T, H, D)
    if layout.token_index is not None:
        flat = [t[layout.token_index] for t in flat]                    # (real tokens, H, D)
    y = flash_attention_varlen(*flat, layout.cu_seqlens, layout.max_seqlen, causal=True, sm_scale=1.0)
    if layout.token_index is not None:                                  # pads get zeros
        y = torch.zeros(B * T, H, D, dtype=y.dtype, device=y.device).index_copy(0, layout.token_index, y)
    return y.view(B, T, H, D).transpose(1, 2)


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

    def forward(self, x, layout, attn, cache, layer):
        h = self.attn_norm(x) if self.pre_ln else x
        h = self.attn(h, layout, attn, cache, layer)
        x = x + F.dropout(h, self.dropout, self.training)
        if not self.pre_ln:
            x = self.attn_norm(x)
        h = self.ffn_norm(x) if self.pre_ln else x
        h = self.fc2(F.relu(self.fc1(h)))
        x = x + F.dropout(h, self.dropout, self.training)
        if not self.pre_ln:
            x = self.ffn_norm(x)
        return x


# ------------------------------------------------------------------------------------- the model

class OPT(nn.Module):
    """OPT with its tied language-model head."""

    def __init__(self, config: OPTConfig, attn: str = "sdpa"):
        super().__init__()
        self.config = config
        self.set_attn(attn)
        e, d = config.word_embed_proj_dim, config.hidden_size
        self.tok_embed = nn.Embedding(config.vocab_size, e, padding_idx=config.pad_token_id)
        self.pos_embed = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, d)
        self.project_in = nn.Linear(e, d, bias=False) if e != d else None
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = (nn.LayerNorm(d, elementwise_affine=config.layer_norm_elementwise_affine)
                           if config.has_final_layer_norm else None)
        self.project_out = nn.Linear(d, e, bias=False) if e != d else None

    def set_attn(self, attn: str) -> None:
        if attn not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn={attn!r}: expected one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        self.attn = attn

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.tok_embed.weight  # tied: (vocab, word_embed_proj_dim)

    def init_weights(self, seed: int | None = None, *, generator: torch.Generator | None = None) -> None:
        """Random initialisation as OPT's: N(0, init_std) weights, zero biases, zero pad embedding.

        Drawn from a generator seeded with `seed`, or from `generator` (which slm/smoke_init.py keeps
        drawing from after this); neither: torch's global one.
        """
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
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

    def new_kv_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        weight = self.tok_embed.weight
        return KVCache(self.config, batch_size, max_len, dtype or weight.dtype, device or weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,                     # (B, T) token ids
        attention_mask: torch.Tensor | None = None,  # (B, past+T), 1 = real token; (B, max_len) in a static step
        *,
        position_ids: torch.Tensor | None = None,    # (B, T) positions, overriding the mask's
        cu_seqlens: torch.Tensor | None = None,      # (N+1,) int32 boundaries of packed sequences
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,  # (T,) long: a static step's columns in the cache
        return_hidden: bool = False,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache_position is not None and cache is None:
            raise ValueError("cache_position (a static decode step) needs a cache to write to")
        if cache is not None and cache_position is None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {past} used, {T} more asked")
        if cu_seqlens is not None:
            if attention_mask is not None or cache is not None:
                raise ValueError("packed sequences (cu_seqlens) take no attention_mask and no cache")
            segment, positions = _segments(cu_seqlens, B, T)
            layout = AttentionLayout(cu_seqlens=cu_seqlens.to(torch.int32),
                                     max_seqlen=max_seqlen or T)
            if self.attn == "sdpa" and input_ids.device.type == "cpu":
                layout.segments = _row_lengths(cu_seqlens, B, T)   # host ints, free on CPU
            elif self.attn != "triton":
                layout.allowed = _packed_allowed(segment)
        else:
            # A static step (KVCache) has a mask over the whole cache and its queries at tensor indices;
            # only shapes are checked there, as reading a value would sync the host at every step.
            if cache_position is not None:
                expected, why = (B, cache.max_len), "the whole cache, in a static step"
            else:
                expected, why = (B, past + T), f"past {past} + new {T}"
                if attention_mask is None:
                    attention_mask = torch.ones(expected, dtype=torch.long, device=input_ids.device)
            if attention_mask is None or attention_mask.shape != expected:
                shape = None if attention_mask is None else tuple(attention_mask.shape)
                raise ValueError(f"attention_mask has shape {shape}, expected {expected} ({why})")
            # OPT's positions: count real tokens so far, so pads never shift a sequence (pads get -1).
            mask = attention_mask.long()
            positions = torch.cumsum(mask, dim=1) * mask - 1                # (B, S)
            if cache_position is not None:
                positions = positions.index_select(1, cache_position)      # (B, T)
                layout = AttentionLayout(allowed=_padded_allowed(mask, cache_position))
            else:
                positions, layout = positions[:, past:], self._padded_layout(mask, past, T)
        if position_ids is not None:
            positions = position_ids

        x = self.embed(input_ids, positions)
        if cache is not None:
            cache.position = cache_position                              # where the layers write
        for i, layer in enumerate(self.layers):
            x = layer(x, layout, self.attn, cache, i)
        if cache is not None and cache_position is None:
            cache.length += T
        if self.final_norm is not None:
            x = self.final_norm(x)
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

    def _padded_layout(self, mask: torch.Tensor, past: int, t: int) -> AttentionLayout:
        if past == 0 and bool(mask.all()):  # decode steps skip the check: no host sync
            return AttentionLayout(causal_only=True)
        if self.attn == "triton" and past == 0:
            # Our kernel has no mask argument: hand it the real tokens as variable-length sequences.
            lengths = mask.sum(dim=1, dtype=torch.int32)
            cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
            token_index = mask.flatten().nonzero().squeeze(1)
            return AttentionLayout(cu_seqlens=cu, max_seqlen=int(lengths.max()), token_index=token_index)
        return AttentionLayout(allowed=_padded_allowed(mask, torch.arange(past, past + t, device=mask.device)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
