"""slm.chat: OpenAI conversations render to the training text; the exported chat template renders the same."""

import json

import pytest

import slm
from slm import chat, toolbench
from tests.checkpoints import TINY_CONFIGS, make_checkpoint
from tests.conftest import shared_path

TOOLS = [{"type": "function", "function": {
    "name": "get_weather_for_weather", "description": 'Weather "now" in a city — Zürich\'s too.\nTwo lines.',
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. 'Paris'"}},
                   "required": ["city"]}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "What's the weather?"}],
    [{"role": "system", "content": "You speak French: «ça va» — \"d'accord\".\nLine two."},
     {"role": "user", "content": 'Météo à "Zürich"?\nPlease 🌦'},
     {"role": "assistant", "content": "I'll check \"Zürich\".",
      "tool_calls": [{"id": "call_1", "type": "function",
                      "function": {"name": "get_weather_for_weather", "arguments": '{"city": "Zürich"}'}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": '{"error": "", "response": "3°C, \\"cold\\"\\n"}'},
     {"role": "assistant", "content": "3°C and \"cold\".\nWrap up!"},
     {"role": "user", "content": "And tomorrow?"}],
    [{"role": "developer", "content": "Short answers."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": None, "reasoning_content": "Check it",
      "tool_calls": [{"id": "x", "type": "function", "function": {"name": "get_weather_for_weather",
                                                                  "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "x", "content": ""}],
]


def trajectory_messages(row: dict) -> tuple[list[dict], list[dict], list[int]]:
    """A ToolBench row as (OpenAI messages, tools, message index of each assistant turn)."""
    conv = row["conversations"]
    head, functions = toolbench.split_system(conv[0]["value"])
    assert head.startswith(chat.SYSTEM_HEAD) and functions[-1] == toolbench.FINISH_FUNCTION
    tools = [{"type": "function", "function": f} for f in functions[:-1]]
    messages, assistant_at = [{"role": "system", "content": head[len(chat.SYSTEM_HEAD):]}], []
    for k, turn in enumerate(conv[1:], start=1):
        value = turn["value"]
        if turn["from"] == "user":
            assert value.startswith("\n") and value.endswith("\nBegin!\n")
            messages.append({"role": "user", "content": value[1:-len("\nBegin!\n")]})
        elif turn["from"] == "function":
            messages.append({"role": "tool", "tool_call_id": f"call_{k - 1}", "content": value})
        else:
            step = toolbench.parse_step(value)
            arguments = value.partition("\nAction Input: ")[2]
            assert toolbench.assistant_value(step.thought, step.action, arguments) == value
            assistant_at.append(len(messages))
            messages.append({"role": "assistant", "content": step.thought, "tool_calls": [
                {"id": f"call_{k}", "type": "function", "function": {"name": step.action, "arguments": arguments}}]})
    return messages, tools, assistant_at


def test_trajectory_renders_to_the_training_text(opt_tokenizer):
    rows = json.loads(shared_path("toolbench", "sft", "toolllama_dfs_data_example.json").read_text())[:6]
    checked = 0
    for row in rows:
        messages, tools, assistant_at = trajectory_messages(row)
        for n, at in enumerate(assistant_at):
            # The training prefix of this assistant turn: BOS + every earlier turn + "Assistant: ".
            turn = [i for i, t in enumerate(row["conversations"]) if t["from"] == "assistant"][n]
            ids = toolbench.prompt_ids(row["conversations"][:turn], opt_tokenizer, max_len=10**6, reserve=0)
            assert toolbench.EOS_TEXT + chat.render(messages[:at], tools) == opt_tokenizer.decode(ids)
            checked += 1
        # The whole row: ToolBench's own text (toolbench.render) when it has one assistant turn.
        if len(assistant_at) == 1 and assistant_at[0] == len(messages) - 1:
            final = row["conversations"][-1]["value"] + toolbench.EOS_TEXT
            assert chat.render(messages[:-1], tools) + final == toolbench.render(row)
    assert checked > 6


def test_parse_round_trips():
    step = chat.render(CONVERSATIONS[1][:3], TOOLS).rsplit("Assistant: ", 2)[1]
    assert step.endswith(toolbench.EOS_TEXT)
    message = chat.parse(step, TOOLS)
    assert message["content"] is None and message["reasoning_content"] == "I'll check \"Zürich\"."
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather_for_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Zürich"}
    finish = chat.render(CONVERSATIONS[1][:5], TOOLS).rsplit("Assistant: ", 2)[1]
    assert chat.parse(finish, TOOLS) == {"role": "assistant", "content": "3°C and \"cold\".\nWrap up!",
                                         "reasoning_content": ""}
    with pytest.raises(toolbench.ParseError, match="not among the offered"):
        chat.parse("\nThought: x\nAction: delete_all\nAction Input: {}", TOOLS)
    with pytest.raises(toolbench.ParseError):
        chat.parse("I think the weather is nice.", TOOLS)


def test_errors_name_the_message():
    with pytest.raises(ValueError, match=r"messages\[1\]: a tool message must answer"):
        chat.render([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c", "content": "y"}])
    with pytest.raises(ValueError, match=r"messages\[1\]: a system message is only accepted as the first"):
        chat.render([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        chat.render([{"role": "robot", "content": "x"}])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model saved by slm.save_model with OPT's real tokenizer files."""
    tmp = tmp_path_factory.mktemp("chat")
    _, path = make_checkpoint(tmp / "in", TINY_CONFIGS["pre_ln"])
    return slm.save_model(slm.load_model(path), tmp / "out", tokenizer=slm.load_tokenizer(shared_path("opt")))


def test_saved_checkpoint_carries_the_template(checkpoint):
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat.CHAT_TEMPLATE


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_apply_chat_template_equals_render(checkpoint, index):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = CONVERSATIONS[index]
    for tools in (TOOLS, None):
        hf = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert hf == chat.render(messages, tools)


def test_smoke_tokenizer_checkpoint_ships_the_template_file(tmp_path):
    """A tokenizer whose merges span words has no tokenizer_config.json; the template ships as chat_template.jinja."""
    from slm.tokenizer import NAMES

    tok = slm.train_tokenizer([chat.render(c, TOOLS) for c in CONVERSATIONS], vocab_size=400,
                              out_dir=tmp_path / "tok", isolate=NAMES)
    _, path = make_checkpoint(tmp_path / "in", TINY_CONFIGS["pre_ln"])
    out = slm.save_model(slm.load_model(path), tmp_path / "out", tokenizer=tok)
    assert not (out / "tokenizer_config.json").exists()
    assert (out / "chat_template.jinja").read_text() == chat.CHAT_TEMPLATE
