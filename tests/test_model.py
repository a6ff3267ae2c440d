"""The model against transformers' OPTForCausalLM: logits, loss and gradients, every config and padding."""

import pytest
import torch
import torch.nn.functional as F

import slm
from checkpoints import OPT_350M, TINY_CONFIGS, make_checkpoint

ATOL_FP32 = 1e-4


def batches(vocab: int, seed: int = 0):
    """Unpadded, right-padded and left-padded batches of 3 rows (ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    full = torch.ones(3, 11, dtype=torch.long)
    right = full.clone()
    right[1, 7:] = 0
    right[2, 4:] = 0
    left = full.clone()
    left[1, :3] = 0
    left[2, :8] = 0
    for name, mask in (("unpadded", full), ("right", right), ("left", left)):
        yield name, ids.masked_fill(mask == 0, 1), mask


def max_diff_on_real(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), TINY_CONFIGS[request.param])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_and_loss_match_transformers(tiny, attn):
    hf, path = tiny
    model = slm.load_model(path, attn=attn)
    for name, ids, mask in batches(hf.config.vocab_size):
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).logits
            out = model(ids, mask)
        assert out.shape == ref.shape
        diff = max_diff_on_real(out, ref, mask)
        assert diff <= ATOL_FP32, f"{name}: max |Δlogits| on real tokens {diff:.2e}"
        # A target counts when it and the token predicting it are real (pad rows differ by design).
        labels = ids.masked_fill((mask == 0) | (mask.roll(1, 1) == 0), -100)
        ref_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss = F.cross_entropy(out[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        assert abs(loss.item() - ref_loss.item()) <= 1e-5, f"{name}: loss {loss.item()} vs {ref_loss.item()}"


def test_gradients_match_transformers(tiny):
    hf, path = tiny
    model = slm.load_model(path, attn="sdpa")
    _, ids, mask = list(batches(hf.config.vocab_size))[1]  # right-padded
    labels = ids.masked_fill(mask == 0, -100)
    hf.zero_grad()
    hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    out = model(ids, mask)
    F.cross_entropy(out[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
    ours = {slm.weights.hf_key(n): p.grad for n, p in model.named_parameters()}
    for name, p in hf.named_parameters():
        if name == "lm_head.weight":  # tied: its gradient is accumulated into embed_tokens
            continue
        diff = (ours[name] - p.grad).abs().max().item()
        assert diff <= 1e-5, f"grad of {name}: max |Δ| {diff:.2e}"


def test_opt350m_config_fp32_parity(tmp_path):
    """The exact opt-350m config (24 post-LN layers, 512->1024 projections), random weights, fp32."""
    hf, path = make_checkpoint(tmp_path / "opt-350m", OPT_350M, layout="hub350m")
    for attn in ("eager", "sdpa"):
        model = slm.load_model(path, attn=attn)
        assert model.num_parameters() == 331_196_416
        for name, ids, mask in batches(OPT_350M["vocab_size"]):
            with torch.no_grad():
                ref = hf(input_ids=ids, attention_mask=mask).logits
                out = model(ids, mask)
            diff = max_diff_on_real(out, ref, mask)
            print(f"opt-350m config, {attn}, {name}: max |Δlogits| = {diff:.2e}")
            assert diff <= ATOL_FP32, f"{attn}/{name}: max |Δlogits| on real tokens {diff:.2e}"


def test_left_padding_equals_unpadded_sequence(tiny):
    _, path = tiny
    model = slm.load_model(path)
    ids = torch.randint(3, 90, (1, 6))
    padded = torch.cat([torch.ones(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask)[:, 4:], model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_decoding_equals_full_forward(tiny, attn):
    hf, path = tiny
    model = slm.load_model(path, attn=attn)
    _, ids, mask = list(batches(hf.config.vocab_size))[2]  # left-padded
    with torch.no_grad():
        full = model(ids, mask)
        cache = model.new_kv_cache(3, 16)
        steps = [model(ids[:, :6], mask[:, :6], cache=cache)]
        for t in range(6, 11):  # one token at a time, as greedy decoding does
            steps.append(model(ids[:, t:t + 1], mask[:, :t + 1], cache=cache))
    assert cache.length == 11
    assert max_diff_on_real(torch.cat(steps, 1), full, mask) <= 1e-5


def test_kv_cache_overflow_is_an_error(tiny):
    _, path = tiny
    model = slm.load_model(path)
    cache = model.new_kv_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model(torch.randint(3, 90, (1, 5)), cache=cache)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_sequences_equal_separate_forwards(tiny, attn):
    _, path = tiny
    model = slm.load_model(path, attn=attn)
    ids = torch.randint(3, 90, (2, 10))
    cu = torch.tensor([0, 3, 4, 10, 17, 20], dtype=torch.int32)  # 5 sequences, one of length 1
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu, max_seqlen=7).flatten(0, 1)
        flat = ids.flatten()
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = model(flat[start:end][None])[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=0)


def test_packed_sdpa_gradients_equal_eager(tiny):
    """On CPU, sdpa runs packed rows one sequence at a time (no mask); eager masks. Same gradients."""
    _, path = tiny
    ids = torch.randint(3, 90, (2, 10))
    cu = torch.tensor([0, 3, 4, 10, 17, 20], dtype=torch.int32)
    grads = {}
    for attn in ("eager", "sdpa"):
        model = slm.load_model(path, attn=attn)
        model(ids, cu_seqlens=cu, max_seqlen=7).logsumexp(-1).sum().backward()
        grads[attn] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["eager"].keys()
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grad, grads["eager"][name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_sequences_must_tile_the_rows(tiny):
    _, path = tiny
    model = slm.load_model(path)
    with pytest.raises(ValueError, match="without a sequence crossing a row"):
        model(torch.randint(3, 90, (2, 10)), cu_seqlens=torch.tensor([0, 4, 12, 20], dtype=torch.int32))


def test_explicit_positions_override_the_mask(tiny):
    _, path = tiny
    model = slm.load_model(path)
    ids = torch.randint(3, 90, (1, 5))
    with torch.no_grad():
        same = model(ids, position_ids=torch.arange(5)[None])
        shifted = model(ids, position_ids=torch.arange(5)[None] + 3)
    torch.testing.assert_close(same, model(ids).detach())
    assert (shifted - same).abs().max() > 1e-3


def test_dropout_only_in_training(tiny):
    _, path = tiny
    model = slm.load_model(path)
    ids = torch.randint(3, 90, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))


def test_unknown_attention_is_an_error():
    with pytest.raises(ValueError, match="attn='flash'"):
        slm.OPT(slm.OPTConfig(**{k: v for k, v in TINY_CONFIGS["pre_ln"].items()}), attn="flash")


def test_init_weights_is_seeded():
    config = slm.OPTConfig(**TINY_CONFIGS["post_ln_proj"])
    a, b = slm.OPT(config), slm.OPT(config)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert a.tok_embed.weight[config.pad_token_id].abs().sum() == 0
