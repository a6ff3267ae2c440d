"""slm.generate against itself and transformers: batched = unbatched = compiled = `OPTForCausalLM.generate()`.

A tiny random OPT is built with transformers, saved in Hugging Face's layout and loaded by both
libraries, so the comparison covers weight loading, left padding, mask-derived positions and the KV
cache. compile=True is checked on the batched calls with sdpa only: its first call per model compiles
(tens of seconds on a CPU). Run: pytest tests/test_generate.py
"""

import os

import pytest
import torch

import slm
from slm.generate import Sampler, generate

transformers = pytest.importorskip("transformers")

# Prompts of different lengths (batching left-pads them); ids avoid the pad id 1.
PROMPTS = [[2, 17, 42, 9, 33, 81, 5, 66, 12], [2, 7], [2, 90, 14, 14, 3, 61], [2]]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["post-ln-projected", "pre-ln"])
def checkpoint(request, tmp_path_factory):
    """A random OPT in both layouts OPT uses: opt-350m's (post-LN, 512->hidden projection) and the others'."""
    torch.manual_seed(0)
    post_ln = request.param == "post-ln-projected"
    config = transformers.OPTConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
        max_position_embeddings=64, word_embed_proj_dim=16 if post_ln else 32,
        do_layer_norm_before=not post_ln, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        dropout=0.0, attention_dropout=0.0,
    )
    hf = transformers.OPTForCausalLM(config)
    # Larger weights than OPT's init make the logits far apart, so fp32 rounding cannot flip an argmax.
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)
    hf.eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


def hf_greedy(hf, prompt, max_new_tokens, eos_id):
    output = hf.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=eos_id, pad_token_id=1,
    )
    return output[0, len(prompt):].tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager", "triton"])
def test_batched_equals_unbatched_equals_transformers(checkpoint, attn):
    hf, path = checkpoint
    if attn == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("attn='triton' needs a GPU or Triton's interpreter (TRITON_INTERPRET=1)")
    model = slm.load_model(path, attn=attn)  # triton serves the (left-padded) prefill
    # An eos that is actually produced mid-sequence by one prompt, so stopping is exercised too.
    free_run = [generate(model, [p], NEW_TOKENS, eos_id=None)[0] for p in PROMPTS]
    assert all(len(t) == NEW_TOKENS for t in free_run)
    eos = free_run[0][NEW_TOKENS // 2]

    unbatched = [generate(model, [p], NEW_TOKENS, eos_id=eos)[0] for p in PROMPTS]
    batched = generate(model, PROMPTS, NEW_TOKENS, eos_id=eos, check_every=3)
    reference = [hf_greedy(hf, p, NEW_TOKENS, eos) for p in PROMPTS]

    assert batched == unbatched
    if attn == "sdpa":
        assert generate(model, PROMPTS, NEW_TOKENS, eos_id=eos, compile=True, check_every=3) == batched
    assert unbatched == reference, f"slm {unbatched}\ntransformers {reference}"
    assert unbatched[0][-1] == eos and len(unbatched[0]) <= NEW_TOKENS // 2 + 1   # stopped, eos kept


@pytest.mark.parametrize("compile", [False, True])
def test_batched_matches_transformers_batched_generate(checkpoint, compile):
    """transformers' own left-padded batch gives the same tokens as ours (it pads finished rows).

    compile=True: one compilation serves every step of the run. A step that changed a shape or a
    Python number would recompile, which fails here.
    """
    hf, path = checkpoint
    model = slm.load_model(path)
    longest = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[1] * (longest - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(longest)[None] >= torch.tensor([longest - len(p) for p in PROMPTS])[:, None]).long()
    output = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=1, min_new_tokens=NEW_TOKENS)
    torch._dynamo.reset()                     # forget earlier tests' compilations of the step
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        tokens = generate(model, PROMPTS, NEW_TOKENS, eos_id=None, compile=compile)
    assert tokens == output[:, longest:].tolist()


def test_static_steps_give_the_logits_of_growing_steps(checkpoint):
    """A static step (whole-cache mask, tensor write index) = the growing cache's step, left padding included."""
    _, path = checkpoint
    model = slm.load_model(path)
    longest, new = max(map(len, PROMPTS)), 3
    ids = torch.tensor([[1] * (longest - len(p)) + p for p in PROMPTS])
    mask = torch.ones(len(PROMPTS), longest + new, dtype=torch.long)
    mask[:, :longest] = (ids != 1).long()
    steps = torch.randint(3, 96, (len(PROMPTS), new), generator=torch.Generator().manual_seed(0))
    growing, static = (model.new_kv_cache(len(PROMPTS), longest + new) for _ in range(2))
    with torch.no_grad():
        for cache in (growing, static):
            model(ids, attention_mask=mask[:, :longest], cache=cache)
        for i in range(new):
            expected = model(steps[:, i:i + 1], attention_mask=mask[:, :longest + i + 1], cache=growing)
            got = model(steps[:, i:i + 1], attention_mask=mask, cache=static,
                        cache_position=torch.tensor([longest + i]))
            assert (got - expected).abs().max() < 1e-5, f"step {i}"
    assert static.length == longest and growing.length == longest + new   # a static step leaves length alone
    with pytest.raises(ValueError, match="needs a cache"):
        model(steps[:, :1], attention_mask=mask, cache_position=torch.tensor([longest]))
    with pytest.raises(ValueError, match=r"expected \(4, 12\) \(the whole cache, in a static step\)"):
        model(steps[:, :1], attention_mask=mask[:, :-1], cache=static, cache_position=torch.tensor([longest]))


def test_edge_cases(checkpoint):
    _, path = checkpoint
    model = slm.load_model(path)
    assert generate(model, [], 5) == []
    assert generate(model, PROMPTS, 0) == [[] for _ in PROMPTS]
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate(model, [[2, 5], []], 4)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        generate(model, [[2] * 60], 5)
    # A single new token (no decode step at all) and a prompt that fills the positions exactly.
    assert len(generate(model, [[2] * 63], 1, eos_id=None)[0]) == 1


def test_sampler_draws_what_transformers_draws(tmp_path):
    """slm.generate with a seeded Sampler = transformers' generate(do_sample=True) from the same seed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1,
                                    bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    hf = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)   # logits far apart, as in test_generate
    hf.save_pretrained(tmp_path)
    model = slm.load_model(tmp_path)
    prompt = [2, 17, 42, 9]
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)]:
        for seed in range(3):
            torch.manual_seed(seed)
            expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                                   max_new_tokens=20, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                   eos_token_id=None, pad_token_id=1)[0, 4:].tolist()
            sampler = Sampler(temperature, top_p, torch.Generator().manual_seed(seed))
            assert slm.generate(model, [prompt], 20, eos_id=None, samplers=[sampler])[0] == expected
