"""train.py's smoke preset: its synthetic data and tokenizer, and the tiny OPT it trains from scratch on a
CPU with two head starts.

    from slm import smoke
    smoke.smoke_data(cfg, run_dir / "smoke", master=True, world=1)   # sets cfg.tokenizer, cfg.data
    model = smoke.model(vocab_size, seed=0)                          # the smoke model, head starts made
    smoke.init_weights(model, seed=0, position_rms=0.05, offset_heads=(1, 2, 3))   # the starts alone

opt-350m arrives pretrained, with the heads that copy a name from earlier in the context (induction
heads). A randomly initialised model has none, and on a CPU budget it barely finds them. Two starts
help (BENCHMARKS.md has the runs): a position table of sine waves (`sinusoidal_table`), so "one token
back" is one linear map at every position, and layer-0 heads fitted to attend a few tokens back
(`fit_offset_heads`), the first half of a copying circuit. Both stay trainable. Only train.py's smoke
preset uses this; `OPT.init_weights` alone is OPT's own initialisation.
"""

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import OPTConfig
from .model import OPT, POSITION_OFFSET
from .tokenizer import load_tokenizer, names_pattern, train_tokenizer

MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, ffn_dim=512, dropout=0.0)
POSITION_RMS = 0.05        # sinusoidal start for the position table; best of 0.02/0.05/0.1
OFFSET_HEADS = (1, 2, 3)   # layer 0 heads that start attending 1, 2 and 3 tokens back
VOCAB = 4096


def model(vocab_size: int, seed: int, **kwargs) -> OPT:
    """The smoke model (MODEL) over `vocab_size` tokens, initialised from `seed` with both head starts;
    kwargs go to slm.OPT (kernels, activation_checkpointing)."""
    smoke_model = OPT(OPTConfig(vocab_size=vocab_size, **MODEL), **kwargs)
    init_weights(smoke_model, seed, position_rms=POSITION_RMS, offset_heads=OFFSET_HEADS)
    return smoke_model


def smoke_data(cfg, directory: Path, master: bool, world: int):
    """Synthetic tasks -> ToolLLaMA rows -> (a BPE tokenizer trained on them) -> shards via data/prepare.py.

    Built once per run directory (a resumed run reuses it, so the tokenizer fingerprint holds). The
    tokenizer is trained only when neither --tokenizer nor --model gave one. cfg: train.py's TrainConfig
    (tokenizer, smoke_tasks, seed, max_len); its tokenizer and data are set to what was built."""
    from data import synthetic
    from data.prepare import prepare
    from slm import toolbench

    tok_dir, data_dir = Path(cfg.tokenizer or directory / "tokenizer"), directory / "data"
    if master and not (data_dir / "meta.json").is_file():
        trajectories = [synthetic.trajectory(t) for t in synthetic.make_tasks("train", cfg.smoke_tasks, cfg.seed)]
        rows = [row for t in trajectories for row in synthetic.explode(t)]   # ToolBench's released form
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "train.json").write_text(json.dumps(rows))
        if cfg.tokenizer is None:
            # Merges may span words: ToolBench's fixed instructions become a few tokens (slm/tokenizer.py).
            texts = [toolbench.render(t) for t in trajectories]
            tok = train_tokenizer(texts, VOCAB, tok_dir, isolate=names_pattern(texts),
                                      max_token_chars=256)
        else:
            tok = load_tokenizer(tok_dir)
        prepare([directory / "train.json"], tok, data_dir, max_len=cfg.max_len, show_progress=False)
    if world > 1:
        dist.barrier()
    cfg.tokenizer, cfg.data = str(tok_dir), str(data_dir)


def init_weights(model: OPT, seed: int, position_rms: float | None, offset_heads: tuple[int, ...] = ()) -> None:
    """OPT's random init (`OPT.init_weights`), then the head starts.

    position_rms: start the (still learned) position table from sine/cosine waves of this RMS
    (`sinusoidal_table`); None keeps OPT's random rows.
    offset_heads: head h of the first layer starts out attending offset_heads[h] tokens back
    (`fit_offset_heads`); needs a position table that can express it, such as the sinusoidal one.
    The fit keeps drawing from the generator that the random init used, so one seed fixes everything.
    """
    generator = torch.Generator().manual_seed(seed)
    model.init_weights(generator=generator)
    if position_rms is not None:
        rows, width = model.pos_embed.weight.shape
        with torch.no_grad():
            model.pos_embed.weight.copy_(sinusoidal_table(rows, width, position_rms))
    if offset_heads:
        fit_offset_heads(model, offset_heads, generator)


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


def fit_offset_heads(model: OPT, offsets, generator: torch.Generator | None = None, steps: int = 150,
                     window: int = 128, batch: int = 4, lr: float = 0.03) -> None:
    """Fit the query and key weights of the first len(offsets) heads of layer 0 so that head h attends
    offsets[h] tokens back. Values, outputs and every other weight keep their random start.

    Why: copying a name from the context is an induction circuit, whose first half is a head that
    reads the previous token, or one a few tokens back (in `city_population_for_<tool>` the words
    before `for_` say which tool follows). From random init a tiny model takes most of a CPU budget to
    find such heads; started from them, it copies within a few hundred steps (BENCHMARKS.md).
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
    targets = torch.stack([t - offset for offset in offsets])         # (heads, T): the key to attend
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
