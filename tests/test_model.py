"""The model against transformers' OPTForCausalLM: logits, loss and gradients, every config and padding;
its kernels chosen by name from the registry, and activation checkpointing. The tests marked `gpu` run on
CUDA where there is one (fp32 matmuls stay fp32 there: torch leaves TF32 off for them by default)."""

import pytest
import torch
import torch.nn.functional as F

import slm
from slm import kernels
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


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_and_loss_match_transformers(tiny, attn, device):
    hf, path = tiny
    hf.to(device)
    model = slm.load_model(path, attn=attn, device=device)
    for name, ids, mask in batches(hf.config.vocab_size):
        ids, mask = ids.to(device), mask.to(device)
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


@pytest.mark.gpu
def test_gradients_match_transformers(tiny, device):
    hf, path = tiny
    hf.to(device)
    model = slm.load_model(path, attn="sdpa", device=device)
    _, ids, mask = list(batches(hf.config.vocab_size))[1]  # right-padded
    ids, mask = ids.to(device), mask.to(device)
    labels = ids.masked_fill(mask == 0, -100)
    hf.zero_grad()
    hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    out = model(ids, mask)
    F.cross_entropy(out[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
    ours = slm.weights.to_hf({n: p.grad for n, p in model.named_parameters()})
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


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_decoding_equals_full_forward(tiny, attn, device):
    hf, path = tiny
    model = slm.load_model(path, attn=attn, device=device)
    _, ids, mask = list(batches(hf.config.vocab_size))[2]  # left-padded
    ids, mask = ids.to(device), mask.to(device)
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


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_sequences_equal_separate_forwards(tiny, attn, device):
    _, path = tiny
    model = slm.load_model(path, attn=attn, device=device)
    ids = torch.randint(3, 90, (2, 10), device=device)
    cu = torch.tensor([0, 3, 4, 10, 17, 20], dtype=torch.int32, device=device)  # 5 sequences, one of length 1
    atol = 1e-5 if device.type == "cpu" else 2e-3   # on CUDA packed rows run our kernel, whose fp32 dot is TF32
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu, max_seqlen=7).flatten(0, 1)
        flat = ids.flatten()
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = model(flat[start:end][None])[0]
            torch.testing.assert_close(packed[start:end], alone, atol=atol, rtol=0)


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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_sequences_run_over_the_flattened_rows(tiny, attn):
    """cu_seqlens counts the B*T tokens as one stream, so a sequence may continue into the next row."""
    _, path = tiny
    model = slm.load_model(path, attn=attn)
    ids = torch.randint(3, 90, (2, 10))
    cu = torch.tensor([0, 4, 12, 20], dtype=torch.int32)   # tokens 4..11 cross from row 0 into row 1
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu, max_seqlen=8).flatten(0, 1)
        torch.testing.assert_close(packed[4:12], model(ids.flatten()[None, 4:12])[0], atol=1e-5, rtol=0)


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


def test_unknown_kernels_are_the_registrys_error():
    config = slm.OPTConfig(**TINY_CONFIGS["pre_ln"])
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'.*attention: eager, sdpa"):
        slm.OPT(config, attn="flash")
    with pytest.raises(ValueError, match="unknown layer_norm implementation 'apex'"):
        slm.OPT(config, kernels={"layer_norm": "apex"})
    with pytest.raises(ValueError, match="unknown op 'rms_norm'"):
        slm.OPT(config, kernels={"rms_norm": "torch"})
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        slm.OPT(config).set_attn("flash")


def test_kernels_resolve_defaults_attn_and_overrides():
    config = slm.OPTConfig(**TINY_CONFIGS["pre_ln"])
    assert slm.OPT(config).kernels == {"attention": "sdpa", "layer_norm": "torch", "linear_cross_entropy": "torch"}
    model = slm.OPT(config, attn="eager")
    assert model.kernels["attention"] == "eager" and model.kernel("attention") is kernels.get("attention", "eager")
    model = slm.OPT(config, attn="eager", kernels={"attention": "triton"})   # kernels= names win over attn=
    assert model.kernels["attention"] == "triton"
    model.set_attn("sdpa")
    assert model.kernel("attention") is kernels.get("attention", "sdpa")


@pytest.fixture
def counting_kernels(kernel_registry):
    """A user's attention and layer_norm, registered as "counted": the references, counting their calls."""
    calls = {"attention": [], "layer_norm": 0}

    def attention(q, k, v, **kwargs):
        calls["attention"].append("packed" if kwargs.get("cu_seqlens") is not None
                                  else "masked" if kwargs.get("mask") is not None else "causal")
        return kernels.get("attention", "eager")(q, k, v, **kwargs)

    def layer_norm(x, weight, bias, eps, residual=None):
        calls["layer_norm"] += 1
        return kernels.get("layer_norm", "torch")(x, weight, bias, eps, residual)

    kernel_registry("attention", "counted", attention)
    kernel_registry("layer_norm", "counted", layer_norm)
    yield calls


@pytest.mark.parametrize("config_name", ["pre_ln", "post_ln_proj"])
def test_a_users_registered_kernels_run_in_every_form(counting_kernels, config_name):
    """kernels={"attention": "counted", ...}: no model edit; packed, causal and masked calls all reach
    the user's function, with the numbers of the reference."""
    config = slm.OPTConfig(**TINY_CONFIGS[config_name])
    model = slm.OPT(config, kernels={"attention": "counted", "layer_norm": "counted"})
    model.init_weights(seed=0)
    reference = slm.OPT(config, attn="eager")
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    ids = torch.randint(3, config.vocab_size, (2, 10))
    cu = torch.tensor([0, 3, 10, 20], dtype=torch.int32)
    left = torch.ones(2, 10, dtype=torch.long)
    left[1, :4] = 0
    with torch.no_grad():
        for kwargs in ({"cu_seqlens": cu, "max_seqlen": 7}, {}, {"attention_mask": left}):
            torch.testing.assert_close(model(ids, **kwargs), reference(ids, **kwargs), atol=1e-5, rtol=0)
    layers = config.num_hidden_layers
    assert counting_kernels["attention"] == ["packed"] * layers + ["causal"] * layers + ["masked"] * layers
    assert counting_kernels["layer_norm"] == 3 * (2 * layers + config.has_final_layer_norm)


@pytest.mark.parametrize("config_name", ["pre_ln", "post_ln_proj"])
def test_activation_checkpointing_gives_identical_losses_and_gradients(config_name):
    """fp32, with dropout (so the recompute must replay the same masks) and packed rows."""
    config = slm.OPTConfig(**{**TINY_CONFIGS[config_name], "dropout": 0.2, "attention_dropout": 0.1})
    plain, checkpointed = slm.OPT(config, attn="eager"), slm.OPT(config, attn="eager", activation_checkpointing=True)
    plain.init_weights(seed=0)
    checkpointed.load_state_dict(plain.state_dict())
    ids = torch.randint(3, config.vocab_size, (2, 12))
    cu = torch.tensor([0, 5, 12, 13, 24], dtype=torch.int32)
    results = []
    for model in (plain, checkpointed):
        model.train()
        runs = []
        model.layers[0].register_forward_pre_hook(lambda *_: runs.append(1))
        torch.manual_seed(7)
        losses = [model(ids, cu_seqlens=cu).logsumexp(-1).mean() for _ in range(2)]   # two draws of dropout
        sum(losses).backward()
        results.append(([loss.item() for loss in losses], {n: p.grad for n, p in model.named_parameters()}))
        assert len(runs) == (4 if model.activation_checkpointing else 2)   # recomputed in backward
    (plain_losses, plain_grads), (ckpt_losses, ckpt_grads) = results
    assert plain_losses == ckpt_losses and plain_losses[0] != plain_losses[1]
    for name, grad in plain_grads.items():
        assert torch.equal(grad, ckpt_grads[name]), name


def test_init_weights_is_seeded():
    config = slm.OPTConfig(**TINY_CONFIGS["post_ln_proj"])
    a, b = slm.OPT(config), slm.OPT(config)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert a.tok_embed.weight[config.pad_token_id].abs().sum() == 0
