"""OPT, the decoder-only transformer of Zhang et al. 2022, written from scratch to compute exactly what
Hugging Face's `OPTForCausalLM` computes.

    model = OPT(OPTConfig.preset("opt-350m"), attn="sdpa")
    logits = model(input_ids, attention_mask)                  # (B, T) -> (B, T, vocab)
    logits = model(input_ids, cu_seqlens=cu, max_seqlen=m)     # packed sequences (training)
    logits = model(new_ids, attention_mask=mask, cache=cache)  # decoding with a KV cache
    logits = model(new_ids, attention_mask=full_mask, cache=cache, cache_position=pos)  # static shapes

The OPT quirks (as in Hugging Face's modeling_opt.py): learned positions offset by 2 and computed from
the attention mask (so left padding gives the first real token position 0); queries scaled after their
bias; post-LN for opt-350m, pre-LN for the others; a 512-wide embedding projected to 1024 in opt-350m;
the LM head tied to the token embedding. Attention and LayerNorm run through the kernel registry (`kernels/`), chosen by
name per op, so a kernel is swapped without editing this file:

    model = OPT(config, kernels={"attention": "triton", "layer_norm": "triton"})   # attn="triton" also works

Attention is called in one of three forms (kernels/attention.py): packed training rows as (B*T, H, D)
with cu_seqlens; unpadded rows dense and causal; padded prefill and decode steps dense with a mask.
`activation_checkpointing=True` recomputes each decoder layer in backward instead of saving its activations.

Module names are ours; `slm/weights.py` maps them to Hugging Face's key names in both directions.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .kernels import registry

from .config import OPTConfig

# Each op's implementation unless `kernels=` names another ("attention" defaults to `attn`).
DEFAULT_KERNELS = {"attention": "sdpa", "layer_norm": "torch", "linear_cross_entropy": "torch"}
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
    """How the tokens of one forward may attend, computed once and shared by every layer: the attention
    op's keyword arguments (kernels/attention.py) besides q, k, v.

    Packed rows: `cu_seqlens` over the flattened B*T tokens and `max_seqlen`. Otherwise `mask`, a boolean
    (B, 1, T, past+T), or None when every row is one whole sequence (plain causal attention).
    """
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None


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
            k, v = cache.write(layer, k, v)                       # decoding: the cache too, (B, H, S, D)
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

    def init_weights(self, seed: int | None = None, *, generator: torch.Generator | None = None) -> None:
        """Random initialisation as OPT's: N(0, init_std) weights, zero biases, zero pad embedding.

        Drawn from a generator seeded with `seed`, or from `generator` (which slm/smoke.py keeps
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
            cu_seqlens = cu_seqlens.to(torch.int32)
            positions = _packed_positions(cu_seqlens, B * T).view(B, T)
            layout = AttentionLayout(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen or T)
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
                layout = AttentionLayout(mask=_padded_allowed(mask, cache_position))
            else:
                positions = positions[:, past:]
                # Unpadded prefill is plain causal (decode steps skip the check: no host sync); else a mask.
                unpadded = past == 0 and bool(mask.all())
                q_pos = torch.arange(past, past + T, device=mask.device)
                layout = AttentionLayout(mask=None if unpadded else _padded_allowed(mask, q_pos))
        if position_ids is not None:
            positions = position_ids

        ops = {op: self.kernel(op) for op in ("attention", "layer_norm")}
        x = self.embed(input_ids, positions)
        if cache is not None:
            cache.position = cache_position                              # where the layers write
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Saves only x; backward reruns the layer (torch's non-reentrant mode, which stops the
                # rerun as soon as the tensors it needs exist) with the RNG state of the first run, so
                # the dropout masks, and with them the gradients, are the same.
                x = checkpoint(layer, x, layout, ops, cache, i, use_reentrant=False, preserve_rng_state=True)
            else:
                x = layer(x, layout, ops, cache, i)
        if cache is not None and cache_position is None:
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
