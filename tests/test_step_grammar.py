"""slm.step_grammar against ToolBench's real steps, and constrained slm.generate on an untrained model.

The grammar must accept every assistant step of the real trajectories in ../shared that calls a declared
function (it never forbids what the model was trained to write), reject malformed steps, and make an
untrained model end in a call whose arguments jsonschema accepts. Run: pytest tests/test_step_grammar.py
"""

import glob
import json

import jsonschema
import pytest
import torch

import slm
from slm import step_grammar, toolbench
from slm.toolbench.template import split_system

from conftest import shared_path

WEATHER = {"name": "get_weather_for_weather", "description": "", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
BOOKING = {"name": "book_for_travel", "description": "", "parameters": {
    "type": "object",
    "properties": {
        "cabin": {"type": "string", "enum": ["economy", "business"]},
        "passengers": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]},
            "minItems": 1, "maxItems": 2},
        "trip": {"type": "object", "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
                 "required": ["from", "to"]},
    },
    "required": ["cabin", "passengers", "trip"]}}


def accepts(grammar, tok, functions, text, tool_choice="auto") -> bool:
    matcher = grammar.matcher(functions, tool_choice)
    try:
        for token in tok.encode(text, add_bos=False) + [slm.tokenizer.EOS_ID]:
            matcher.advance(token)
    except ValueError:
        return False
    return matcher.done


def real_steps():
    """(declared functions without Finish, assistant value) of every real trajectory step in ../shared."""
    root = shared_path("toolbench")
    files = sorted(glob.glob(str(root / "sft" / "*.json")) + glob.glob(str(root / "trajectories" / "**" / "*.json"),
                                                                      recursive=True))
    for path in files:
        data = json.loads(open(path).read())
        for row in data if isinstance(data, list) else [data]:
            conversations = row.get("conversations") or []
            if not conversations:
                continue
            functions = [f for f in split_system(conversations[0]["value"])[1] if f["name"] != toolbench.FINISH]
            for message in conversations:
                if message["from"] == "assistant":
                    yield functions, message["value"]


def test_accepts_every_real_step_that_calls_a_declared_function(opt_tokenizer):
    grammar = step_grammar.for_tokenizer(opt_tokenizer)
    checked, rejected = 0, []
    for functions, value in real_steps():
        step = toolbench.parse_step(value)
        thought_has_action = "\nAction: " in value.partition("\nAction: ")[2].partition("\nAction Input: ")[0]
        if step.action not in {f["name"] for f in functions} | {toolbench.FINISH} or thought_has_action:
            continue   # undeclared names are rejected on purpose (see the module docstring)
        checked += 1
        if not accepts(grammar, opt_tokenizer, functions, value):
            rejected.append(value[:120])
    assert checked > 100
    assert not rejected, rejected


@pytest.mark.parametrize("text", [
    '\nThought: x\nAction: get_weather\nAction Input: {"city":"Paris"}',            # undeclared name
    '\nThought: x\nAction: get_weather_for_weather\nAction Input: {"town":"Paris"}',  # missing required key
    '\nThought: x\nAction: get_weather_for_weather\nAction Input: {"city":3}',        # wrong type
    '\nThought: x\nAction: get_weather_for_weather\nAction Input: {"city":"Paris"',   # unclosed
    '\nAction: get_weather_for_weather\nAction Input: {"city":"Paris"}',             # no thought
    '\nThought: x\nAction: Finish\nAction Input: {"return_type":"give_in"}',         # Finish's enum
    '\nThought: x\nAction Input: {}\nAction: get_weather_for_weather\nAction Input: {"city":"Paris"}',  # parsed as x's
])
def test_rejects_malformed_steps(opt_tokenizer, text):
    grammar = step_grammar.for_tokenizer(opt_tokenizer)
    assert not accepts(grammar, opt_tokenizer, [WEATHER], text)


def test_tool_choice_sets_the_allowed_names(opt_tokenizer):
    grammar = step_grammar.for_tokenizer(opt_tokenizer)
    call = '\nThought: x\nAction: get_weather_for_weather\nAction Input: {"city":"Paris"}'
    finish = '\nThought: x\nAction: Finish\nAction Input: {"return_type":"give_answer","final_answer":"ok"}'
    assert accepts(grammar, opt_tokenizer, [WEATHER], call, "required")
    assert not accepts(grammar, opt_tokenizer, [WEATHER], finish, "required")
    assert accepts(grammar, opt_tokenizer, [WEATHER], finish, "none")
    assert not accepts(grammar, opt_tokenizer, [WEATHER], call, "none")
    assert accepts(grammar, opt_tokenizer, [WEATHER, BOOKING], call, {"name": WEATHER["name"]})
    assert not accepts(grammar, opt_tokenizer, [WEATHER, BOOKING], call, {"name": BOOKING["name"]})


def untrained_model(vocab_size: int, seed: int):
    torch.manual_seed(seed)
    config = slm.OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           ffn_dim=64, max_position_embeddings=512, word_embed_proj_dim=32)
    return slm.OPT(config).eval()


@pytest.mark.parametrize("tool_choice", ["required", {"name": BOOKING["name"]}])
@pytest.mark.parametrize("seed", [0, 1])
def test_untrained_model_ends_in_a_schema_valid_call(opt_tokenizer, tool_choice, seed):
    grammar = step_grammar.for_tokenizer(opt_tokenizer)
    model = untrained_model(50272, seed)   # OPT's embedding rows: wider than the tokenizer's 50265
    functions = [WEATHER, BOOKING]
    prompts = [opt_tokenizer.encode("User: book a flight\nAssistant: "), opt_tokenizer.encode("Assistant: ")]
    matchers = [grammar.matcher(functions, tool_choice, thought_chars=64, value_chars=48) for _ in prompts]
    outputs = slm.generate(model, prompts, max_new_tokens=256, constraints=matchers)
    schemas = {f["name"]: f["parameters"] for f in functions}
    for tokens in outputs:
        assert tokens[-1] == slm.tokenizer.EOS_ID, "no </s> within 256 new tokens"
        step = toolbench.parse_step(opt_tokenizer.decode(tokens[:-1]))
        assert step.action in schemas
        if isinstance(tool_choice, dict):
            assert step.action == tool_choice["name"]
        jsonschema.validate(step.action_input, schemas[step.action])


def test_unconstrained_rows_decode_as_without_constraints(opt_tokenizer):
    model = untrained_model(50272, 0)
    prompts = [opt_tokenizer.encode("Assistant: "), opt_tokenizer.encode("User: hi\nAssistant: ")]
    plain = slm.generate(model, prompts, max_new_tokens=16)
    matcher = step_grammar.for_tokenizer(opt_tokenizer).matcher([WEATHER], "required")
    mixed = slm.generate(model, prompts, max_new_tokens=16, constraints=[None, matcher])
    assert mixed[0] == plain[0]


def test_works_with_a_trained_tokenizer_whose_merges_span_words(tmp_path):
    """The smoke models' kind of tokenizer: whole phrases as tokens, names isolated."""
    steps = [step.partition("\nAction Input: ")[0] for _, step in real_steps()][:40]
    tok = slm.train_tokenizer(steps * 3, 600, tmp_path, isolate=slm.tokenizer.NAMES)
    grammar = step_grammar.for_tokenizer(tok)
    call = ('\nThought: I will check the weather.\nAction: get_weather_for_weather'
            '\nAction Input: {\n  "city": "Paris"\n}')
    assert accepts(grammar, tok, [WEATHER], call)
    assert not accepts(grammar, tok, [WEATHER], call.replace("get_weather_for_weather", "get_weather"))


def test_value_bound_keeps_enum_values(opt_tokenizer):
    """A bound shorter than an enum's longest value must not forbid it (Finish's "give_up_and_restart")."""
    grammar = step_grammar.for_tokenizer(opt_tokenizer)
    give_up = '\nThought: x\nAction: Finish\nAction Input: {"return_type":"give_up_and_restart"}'
    long_city = '\nThought: x\nAction: get_weather_for_weather\nAction Input: {"city":"Llanfairpwllgwyngyll"}'
    bounded = grammar.matcher([WEATHER], "auto", value_chars=8)
    for token in opt_tokenizer.encode(give_up, add_bos=False) + [slm.tokenizer.EOS_ID]:
        bounded.advance(token)
    assert bounded.done
    assert accepts(grammar, opt_tokenizer, [WEATHER], long_city)
    with pytest.raises(ValueError):
        matcher = grammar.matcher([WEATHER], "auto", value_chars=8)
        for token in opt_tokenizer.encode(long_city, add_bos=False):
            matcher.advance(token)


def test_evaluate_constrained_leaves_long_finish_answers_whole(opt_tokenizer):
    import evaluate
    decoder = evaluate.Decoder(None, opt_tokenizer, 1024, max_new_tokens=64, batch_size=1, constrained=True)
    [matcher] = decoder._constraints([evaluate.GrammarPrompt([2], functions=[WEATHER])])
    answer = "The weather in Paris is sunny, 21 degrees, with a light wind from the west all afternoon. " * 2
    step = ('\nThought: I have it.\nAction: Finish\nAction Input: '
            + json.dumps({"return_type": "give_answer", "final_answer": answer}))
    for token in opt_tokenizer.encode(step, add_bos=False) + [slm.tokenizer.EOS_ID]:
        matcher.advance(token)
    assert matcher.done


def test_batched_mask_equals_each_rows_own_bitmask(opt_tokenizer):
    """mask_logits fills all rows' masks together; each row must equal its matcher's own compute_bitmask."""
    grammar = step_grammar.for_tokenizer(opt_tokenizer)
    prefixes = ["", "\nThought: let me see", "\nThought: x\nAction: ", '\nThought: x\nAction: get_weather_for_weather'
                '\nAction Input: {"city":"Par']
    matchers = []
    for text in prefixes:
        matcher = grammar.matcher([WEATHER, BOOKING], "auto")
        for token in opt_tokenizer.encode(text, add_bos=False) if text else []:
            matcher.advance(token)
        matchers.append(matcher)
    done = grammar.matcher([WEATHER], "required")
    for token in opt_tokenizer.encode('\nThought: x\nAction: get_weather_for_weather\nAction Input: {"city":"P"}',
                                      add_bos=False) + [slm.tokenizer.EOS_ID]:
        done.advance(token)
    assert done.done
    matchers = [matchers[0], None, *matchers[1:], done]
    logits = torch.randn(len(matchers), 50272)   # OPT's embedding rows: wider than the tokenizer's 50265
    masked = logits.clone()
    step_grammar.mask_logits(masked, matchers)
    vocab = opt_tokenizer.vocab_size
    for row, matcher in enumerate(matchers):
        if matcher is None:
            assert torch.equal(masked[row], logits[row])
            continue
        if matcher.done:
            expected = torch.zeros(vocab, dtype=torch.bool)
            expected[slm.tokenizer.EOS_ID] = True
        else:
            words = matcher._matcher.compute_bitmask()
            expected = torch.tensor([bool(words[t // 8] >> (t % 8) & 1) for t in range(vocab)])
        kept = masked[row] != float("-inf")
        assert torch.equal(kept[:vocab], expected), f"row {row}"
        assert not kept[vocab:].any()
        assert torch.equal(masked[row][kept], logits[row][kept])


def test_for_tokenizer_takes_a_directory(tmp_path, opt_tokenizer):
    opt_tokenizer.save(tmp_path)
    grammar = step_grammar.for_tokenizer(str(tmp_path))
    call = '\nThought: x\nAction: get_weather_for_weather\nAction Input: {"city":"P"}'
    assert accepts(grammar, opt_tokenizer, [WEATHER], call)


def test_thought_is_free_unless_bounded(opt_tokenizer):
    grammar = step_grammar.for_tokenizer(opt_tokenizer)
    step = ("\nThought: " + "I will check the weather first. " * 60
            + '\nAction: get_weather_for_weather\nAction Input: {"city":"P"}')
    assert accepts(grammar, opt_tokenizer, [WEATHER], step)   # 1,900 characters
    bounded = grammar.matcher([WEATHER], "auto", thought_chars=500)
    with pytest.raises(ValueError):
        for token in opt_tokenizer.encode(step, add_bos=False):
            bounded.advance(token)
    with pytest.raises(ValueError, match="thought_chars"):
        grammar.matcher([WEATHER], "auto", thought_chars=step_grammar.MAX_THOUGHT_CHARS + 1)
    grammar.matcher([WEATHER], "auto", thought_chars=step_grammar.MAX_THOUGHT_CHARS)   # compiles


def test_toolbench_integers_take_any_number(opt_tokenizer):
    """ToolBench declares its NUMBER parameters "integer"; their values (a longitude, 127.9 kg) are any number."""
    import evaluate
    grammar = step_grammar.for_tokenizer(opt_tokenizer)
    convert = {"name": "kilograms_to_pounds_for_units", "description": "", "parameters": {
        "type": "object", "properties": {"value": {"type": "integer"}}, "required": ["value"]}}
    step = '\nThought: x\nAction: kilograms_to_pounds_for_units\nAction Input: {"value": 127.9}'
    assert not accepts(grammar, opt_tokenizer, [convert], step)   # an OpenAI tool's integer is an integer
    decoder = evaluate.Decoder(None, opt_tokenizer, 1024, max_new_tokens=64, batch_size=1, constrained=True)
    [matcher] = decoder._constraints([evaluate.GrammarPrompt([2], functions=[convert])])
    for token in opt_tokenizer.encode(step, add_bos=False) + [slm.tokenizer.EOS_ID]:
        matcher.advance(token)
    assert matcher.done


def test_a_bounded_thought_is_one_line(opt_tokenizer):
    grammar = step_grammar.for_tokenizer(opt_tokenizer)
    call = '\nAction: get_weather_for_weather\nAction Input: {"city":"P"}'
    for thought, ok in [("one line", True), ("two\nlines", False)]:
        matcher = grammar.matcher([WEATHER], "auto", thought_chars=64)
        try:
            for token in opt_tokenizer.encode("\nThought: " + thought + call, add_bos=False) + [slm.tokenizer.EOS_ID]:
                matcher.advance(token)
            assert matcher.done == ok
        except ValueError:
            assert not ok
    assert accepts(grammar, opt_tokenizer, [WEATHER], "\nThought: two\nlines" + call)   # unbounded: any lines


def test_a_failed_grammar_leaves_its_row_free(opt_tokenizer):
    """If llguidance gives up on a grammar (its lexer limits), the row decodes unconstrained, never cut to EOS."""
    grammar = step_grammar.for_tokenizer(opt_tokenizer)
    failed, fine = grammar.matcher([WEATHER], "required"), grammar.matcher([WEATHER], "required")
    assert not failed._matcher.consume_token(opt_tokenizer.encode("Hello", add_bos=False)[0])   # drives it to error
    assert failed.failed and not failed.done
    failed.advance(5)   # a no-op now
    rows = step_grammar.allowed([failed, fine])
    assert rows[0].all()
    assert 0 < rows[1].sum() < rows.shape[1]
