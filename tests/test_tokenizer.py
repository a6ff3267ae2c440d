"""The tokenizer against Hugging Face's own OPT test vectors and its GPT2Tokenizer on real ToolBench text."""

import json

import pytest

import slm
from slm.tokenizer import NAMES, names_pattern
from conftest import shared_path

# Ids that transformers' own OPT tests hard-code (tests/models/opt/ in its repository).
HF_VECTORS = [
    ("A photo of a cat", True, [2, 250, 1345, 9, 10, 4758]),
    ("Today is a beautiful day and I want to", False, [5625, 16, 10, 2721, 183, 8, 38, 236, 7]),
    ("In the city of", False, [1121, 5, 343, 9]),
    ("Paris is the capital of France and", False, [32826, 16, 5, 812, 9, 1470, 8]),
    ("Computers and mobile phones have taken", False, [14721, 43990, 8, 1830, 4247, 33, 551]),
    ("Hello, my dog is a little", True, [2, 31414, 6, 127, 2335, 16, 10, 410]),
    ("Hello world! cécé herlolip</s>", False, [31414, 232, 328, 740, 1140, 12695, 69, 46078, 1588, 2]),
]


@pytest.mark.parametrize("text,add_bos,ids", HF_VECTORS)
def test_hugging_face_vectors(opt_tokenizer, text, add_bos, ids):
    assert opt_tokenizer.encode(text, add_bos=add_bos) == ids


def test_end_of_turn_is_one_token_and_decode_round_trips(opt_tokenizer):
    text = "Assistant: \nThought: \nAction: f_for_tool\nAction Input: {\"a\": 1}</s>Function: {}"
    ids = opt_tokenizer.encode(text, add_bos=False)
    assert ids.count(2) == 1
    assert opt_tokenizer.decode(ids) == text
    assert opt_tokenizer.encode("</s>", add_bos=False) == [2]
    assert (opt_tokenizer.eos_id, opt_tokenizer.pad_id, opt_tokenizer.bos_id) == (2, 1, 2)


def test_matches_transformers_on_real_toolbench_rows(opt_tokenizer):
    from transformers import GPT2Tokenizer

    opt = shared_path("opt")
    hf = GPT2Tokenizer(str(opt / "vocab.json"), str(opt / "merges.txt"), add_bos_token=True,
                       bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>")
    rows = json.loads(shared_path("toolbench", "sft", "toolllama_dfs_data_example.json").read_text())
    for row in rows[:5]:
        for turn in row["conversations"]:
            text = turn["value"] + "</s>"
            assert opt_tokenizer.encode(text) == hf(text)["input_ids"], turn["value"][:80]


def test_missing_files_are_named(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks merges.txt"):
        slm.load_tokenizer(tmp_path)


def test_trained_tokenizer_keeps_opt_special_ids(tmp_path):
    corpus = ["Thought: call the weather tool\nAction: get_weather_for_demo</s>"] * 50
    tok = slm.train_tokenizer(corpus, vocab_size=300, out_dir=tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    ids = tok.encode(corpus[0])
    assert ids[0] == 2 and ids[-1] == 2 and tok.decode(ids[1:]) == corpus[0]
    assert slm.load_tokenizer(tmp_path).fingerprint == tok.fingerprint


def test_trained_tokenizer_with_merges_across_words(tmp_path):
    corpus = ["You are AutoGPT, you can use many tools.\nAction: get_weather_for_demo</s>",
              'What is the size of the city Brakai? Action: city_size_for_zabrus_cities {"city": "Brakai"} 1234'] * 50
    tok = slm.train_tokenizer(corpus, vocab_size=400, out_dir=tmp_path / "tok", isolate=NAMES)
    assert tok.isolate == NAMES
    ids = tok.encode(corpus[0], add_bos=False)
    assert len(ids) < len(corpus[0].split()) + 6     # lowercase phrases became single tokens
    assert ids[-1] == 2 and tok.decode(ids) == corpus[0]
    # Names, function-name parts and numbers get the same tokens in any context: copyable.
    # (with merges free to span them, " Brakai" and '"Brakai' would be single tokens here)
    # A tool's name is copyable from the tool list, a description or another function's name alike.
    for text in ("call get_rain_for_zabrus_units with 1234 on Brakai", '1.zabrus_units: "Brakai", n=1234',
                 'x: "Brakai", tool "zabrus_units", 1234'):
        ids = tok.encode(text, add_bos=False)
        for name in ("Brakai", "zabrus_", "units", "1234"):
            alone = tok.encode(name, add_bos=False)
            assert any(ids[i:i + len(alone)] == alone for i in range(len(ids))), (text, name)
    tok.save(tmp_path / "copy")                      # the regex travels with the files
    copy = slm.load_tokenizer(tmp_path / "copy")
    assert copy.encode(corpus[0]) == tok.encode(corpus[0]) and copy.fingerprint == tok.fingerprint
    for bad, message in (('{"isolate": 3}', "isolate must be a non-empty regex"),
                         ('{"split": "x"}', "expected"), ('{"isolate": "(["}', "not a valid regex")):
        (tmp_path / "copy" / "pretokenizer.json").write_text(bad)
        with pytest.raises(ValueError, match=message):
            slm.load_tokenizer(tmp_path / "copy")


def test_names_pattern_leaves_the_corpus_words_free_to_merge(tmp_path):
    corpus = [f"Thought: I call the Action now.\nAction: get_{name.lower()}\nName: {name}</s>"
              for name in ("Brakai", "Zefor", "Tillou", "Moxa", "Pradin")] * 20
    pattern = names_pattern(corpus, min_share=0.5)
    isolated = slm.train_tokenizer(corpus, vocab_size=400, out_dir=tmp_path / "a", isolate=NAMES)
    merged = slm.train_tokenizer(corpus, vocab_size=400, out_dir=tmp_path / "b", isolate=pattern)
    text = corpus[0]
    assert len(merged.encode(text)) < len(isolated.encode(text))   # "Thought", "Action" merge on
    for tok in (isolated, merged):
        ids = tok.encode("Name: Quorin and Brakai", add_bos=False)
        for name in ("Brakai", "Quorin"):                          # names stay whole-word pieces
            alone = tok.encode(name, add_bos=False)
            assert any(ids[i:i + len(alone)] == alone for i in range(len(ids)))
    assert names_pattern(["no capitals here"]) == NAMES
