"""The datasets people already have, each written in the test in its owner's documented shape (LMFlow's
DATASETS.md, LLaMA-Factory's data/README.md, OpenAI's chat format): the exact loss mask token by token,
every refusal one line naming the file, the record and the field, unused fields named in a note, the
counts line, and the reliability cases (surrogates, U+2028, nesting, directories, huge lines)."""
import json

import pytest

from nanolisa.data import read_dataset, tokenize_dataset
from nanolisa.errors import UserError
from nanolisa.tokenizer import load_tokenizer
from tests.helpers import run_script

TOOL = {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SCHEMA = {"type": "function", "function": TOOL}  # bare tools are wrapped so, as LLaMA-Factory does
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def write(tmp_path, name, obj, jsonl=False):
    p = tmp_path / name
    if isinstance(obj, (bytes, str)):
        (p.write_bytes if isinstance(obj, bytes) else p.write_text)(obj)
    else:
        p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in obj) if jsonl else json.dumps(obj),
                     encoding="utf-8")
    return str(p)


def expected(tok, pieces):
    """(input_ids, labels) of the text pieces, each (text, trained): the mask token by token. The tiny
    tokenizer is byte-level, so the pieces tokenize exactly as the whole text does."""
    ids, labels = [], []
    for text, trained in pieces:
        t = tok.encode(text, add_special_tokens=False)
        ids += t
        labels += t if trained else [-100] * len(t)
    return ids, labels


def example(tok, path, template=None, seq_len=4096, i=0):
    return tokenize_dataset(read_dataset(path), tok, seq_len, template=template, cache_dir=False).examples[i]


def qwen_system(system, tools):
    return ("<|im_start|>system\n" + system + "\n\n# Tools\n\nYou may call one or more functions to assist with the "
            "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>"
            + "".join("\n" + json.dumps(t) for t in tools) + "\n</tools>\n\nFor each function call, return a json "
            "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")


# ---- LLaMA-Factory: alpaca with history, sharegpt tool calls, v1 ----------------------------------------------
def test_alpaca_history_rounds_are_trained(tmp_path, tok):
    rec = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief.",
           "history": [["Hi", "Hello!"], ["Who are you?", "A bot."]]}
    path = write(tmp_path, "alpaca.json", [rec])
    assert example(tok, path) == expected(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Hello!<|im_end|>", 1), ("\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("A bot.<|im_end|>", 1), ("\n<|im_start|>user\nAdd\n2 and 3<|im_end|>\n<|im_start|>assistant\n", 0),
        ("5<|im_end|>", 1), ("\n", 0)])


def test_llama_factory_sharegpt_tool_call_is_trained_and_its_observation_is_not(tmp_path, tok):
    """glaive_toolcall_en_demo.json's shape: function_call / observation turns, tools as a JSON string."""
    rec = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": '{"temp": 20}'},
        {"from": "gpt", "value": "It is 20 C."}], "tools": json.dumps([TOOL])}
    path = write(tmp_path, "glaive.json", [rec])
    assert read_dataset(path).instances[0]["tools"] == [SCHEMA]
    assert example(tok, path, "qwen2") == expected(tok, [
        (qwen_system("You are a helpful assistant.", [SCHEMA]) +
         "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", 0),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>', 1),
        ('\n<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response><|im_end|>\n<|im_start|>assistant\n', 0),
        ("It is 20 C.<|im_end|>", 1), ("\n", 0)])


def test_llama_factory_v1_text_parts_and_loss_weight(tmp_path, tok):
    """v1_sft_demo.jsonl's shape: content as a list of {"type": "text", "value"}, loss_weight per message."""
    hi = [{"type": "text", "value": "hi "}, {"type": "text", "value": "there"}]
    rec = {"messages": [{"role": "user", "content": hi, "loss_weight": 0.0},
                        {"role": "assistant", "content": [{"type": "text", "value": "Hello!"}], "loss_weight": 1.0}]}
    path = write(tmp_path, "v1.jsonl", [rec], jsonl=True)
    assert example(tok, path) == expected(tok, [
        ("<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", 0), ("Hello!<|im_end|>", 1), ("\n", 0)])
    rec["messages"][1]["loss_weight"] = 0.0  # an assistant message not to be trained: nanolisa cannot say so
    with pytest.raises(UserError, match=r"v1\.jsonl: line 1: messages\[1\]: 'loss_weight' 0.0 on the assistant"):
        read_dataset(write(tmp_path, "v1.jsonl", [rec], jsonl=True))


# ---- LMFlow: conversation with tools, empty template -----------------------------------------------------------
def test_lmflow_conversation_tool_call_is_trained_and_its_observation_is_not(tmp_path, tok):
    """LMFlow's function-call format (contrib/tool-finetune): tools a list of JSON strings, roles function and
    observation; written here in Llama 3.1's tool format."""
    inst = {"conversation_id": 1, "system": "You help.", "tools": [json.dumps(TOOL)], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "function", "content": json.dumps(CALL)},
        {"role": "observation", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}
    path = write(tmp_path, "lmflow.json", {"type": "conversation", "instances": [inst]})
    header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    assert example(tok, path, "llama3") == expected(tok, [
        ("<s>" + header("system") + "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul "
         "2024\n\nYou help.<|eot_id|>" + header("user") + "Given the following functions, please respond with a JSON "
         "for a function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
         "{\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables."
         "\n\n" + json.dumps(SCHEMA, indent=4) + "\n\nWeather in Paris?<|eot_id|>" + header("assistant"), 0),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', 1),
        (header("ipython") + '"sunny"<|eot_id|>' + header("assistant"), 0),
        ("Sunny.<|eot_id|>", 1)])


def test_lmflow_empty_template_puts_bos_before_user_turns_and_trains_eos(tmp_path, tok):
    inst = {"messages": [{"role": "user", "content": "[INST] Hi [/INST]"}, {"role": "assistant", "content": "Hey"},
                         {"role": "user", "content": "[INST] Bye [/INST]"}, {"role": "assistant", "content": "Ciao"}]}
    path = write(tmp_path, "formatted.json", {"type": "conversation", "instances": [inst]})
    assert example(tok, path, "empty") == expected(tok, [
        ("<s>[INST] Hi [/INST]", 0), ("Hey</s>", 1), ("<s>[INST] Bye [/INST]", 0), ("Ciao</s>", 1)])
    assert example(tok, path, "empty_no_special_tokens") == expected(tok, [
        ("[INST] Hi [/INST]", 0), ("Hey", 1), ("[INST] Bye [/INST]", 0), ("Ciao", 1)])


# ---- OpenAI-style ------------------------------------------------------------------------------------------------
def test_openai_tool_calls_tool_results_and_text_parts(tmp_path, tok):
    rec = {"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "20 C"},
        {"role": "assistant", "content": "20 C."}], "tools": [SCHEMA]}
    path = write(tmp_path, "openai.jsonl", [rec], jsonl=True)
    call = read_dataset(path).instances[0]["messages"][1]["tool_calls"][0]
    assert call == {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "c1"}
    assert example(tok, path, "qwen2_5") == expected(tok, [
        (qwen_system("S", [SCHEMA]) + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", 0),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>', 1),
        ("\n<|im_start|>user\n<tool_response>\n20 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n", 0),
        ("20 C.<|im_end|>", 1), ("\n", 0)])


# ---- refusals ----------------------------------------------------------------------------------------------------
CONV = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
REFUSED = [
    ("mllm.json", [{"messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Kane."}],
                    "images": ["1.jpg"]}], r"record 0: field 'images' holds media"),
    ("video.json", [{"conversations": CONV, "videos": ["1.mp4"]}], r"record 0: field 'videos' holds media"),
    ("audio.jsonl", [{"messages": MSGS, "audios": ["1.wav"]}], r"line 1: field 'audios' holds media"),
    ("v1mm.jsonl", [{"messages": [{"role": "user", "content": [{"type": "image_url", "value": "1.jpg"},
                                                               {"type": "text", "value": "Who?"}]},
                                  {"role": "assistant", "content": [{"type": "text", "value": "Kane."}]}]}],
     r"line 1: messages\[0\]\.content\[0\]: content part of type 'image_url'"),
    ("dpo.json", [{"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"},
                   "rejected": {"from": "gpt", "value": "b"}}], r"record 0: field 'chosen': this is preference data"),
    ("pref.json", [{"instruction": "hi", "input": "", "chosen": "a", "rejected": "b"}],
     r"record 0: field 'chosen': this is preference data"),
    ("v1dpo.jsonl", [{"chosen_messages": MSGS, "rejected_messages": MSGS}],
     r"line 1: field 'chosen_messages': this is preference data"),
    ("paired.json", {"type": "paired_conversation", "instances": [{"chosen": {"messages": MSGS},
                                                                   "rejected": {"messages": MSGS}}]},
     r"paired\.json: type 'paired_conversation' is preference data"),
    ("image_text.json", {"type": "image_text", "instances": []}, r"type 'image_text' is images with text"),
    ("kto.json", [{"messages": MSGS, "label": False}], r"record 0: field 'label' = false: this is KTO data"),
    ("kto_tag.json", [{"conversations": CONV, "kto_tag": True}], r"record 0: field 'kto_tag' = true: this is KTO"),
    ("call.json", [{"conversations": [CONV[0], {"from": "function_call", "value": "get_weather(Paris)"},
                                      {"from": "observation", "value": "20"}, CONV[1]]}],
     r"record 0: conversations\[1\]: not valid JSON .*expected a tool call"),
    ("call2.json", [{"conversations": [CONV[0], {"from": "function_call", "value": '{"name": "f"}'},
                                       {"from": "observation", "value": "20"}, CONV[1]]}],
     r"record 0: conversations\[1\]: a tool call must be a JSON object with 'name' and 'arguments'"),
    ("tools.json", [{"conversations": CONV, "tools": "get_weather(city)"}], r"record 0: field 'tools': not valid JSON"),
    ("obs.json", [{"conversations": [CONV[0], {"from": "observation", "value": "20"}]}],
     r"record 0: conversations\[1\]: role 'observation' \(tool\) where 'assistant' was expected"),
    ("end.json", [{"conversations": [CONV[0], {"from": "function_call", "value": json.dumps(CALL)},
                                     {"from": "observation", "value": "20"}]}],
     r"record 0: conversation ends with role 'observation'"),
    ("fn.jsonl", [{"messages": [MSGS[0], {"role": "function", "content": "x"}]}],
     r"line 1: messages\[1\]: unknown role 'function' \(LMFlow's tool call, or OpenAI's old function result"),
    ("user.json", [{"conversations": [CONV[0]]}], r"record 0: conversation ends with role 'human'"),
    ("sur.json", '[{"instruction": "a\\ud800b", "output": "c"}]',
     r"record 0: field 'instruction' holds a lone surrogate"),
    ("sur.jsonl", '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "\\udc00"}]}',
     r"line 1: field 'conversations\[1\].value' holds a lone surrogate"),
    ("deep.json", "[" * 100000 + "]" * 100000, r"deep\.json: JSON nested too deeply"),
    ("deep.jsonl", '{"text": "a", "x": ' + "[" * 100000 + "]" * 100000 + "}",
     r"deep\.jsonl: line 1: JSON nested too deeply"),
    ("t.csv", "instruction,output\na,b\n", r"t\.csv: csv files are not read"),
    ("bad.json", b'[{"text": "caf\xe9"}]', r"bad\.json: not UTF-8 text"),
]


@pytest.mark.parametrize("name,content,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_refusal_is_one_line_naming_file_record_and_field(tmp_path, name, content, message):
    path = write(tmp_path, name, content, jsonl=name.endswith(".jsonl"))
    with pytest.raises(UserError, match=message) as e:
        read_dataset(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(path)


def test_directory_problems_are_one_line(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write(d, "a.json", {"type": "text_only", "instances": [{"text": "x"}]})
    write(d, "notes.md", "not data")
    write(d, "more.jsonl", '{"text": "y"}')
    ds = read_dataset(str(d), quiet=True)
    assert len(ds) == 1 and ds.notes == [f"{d}: read the 1 *.json file (LMFlow's rule); not read: more.jsonl, notes.md"]
    (d / "sub.json").mkdir()
    with pytest.raises(UserError, match=r"sub\.json: is a directory"):
        read_dataset(str(d))
    (d / "sub.json").rmdir()
    write(d, "z.json", b'{"type": "text_only", "instances": [{"text": "\xff"}]}')
    with pytest.raises(UserError, match=r"z\.json: not UTF-8 text"):
        read_dataset(str(d))


# ---- notes ---------------------------------------------------------------------------------------------------
def test_unused_fields_are_named_in_one_note(tmp_path, tok, capsys):
    recs = [{"id": 1, "source": "web", "conversations": [{"from": "human", "value": "hi"},
                                                         {"from": "gpt", "value": "hello", "weight": 1}]},
            {"id": 2, "conversations": CONV, "images": []}]  # an empty media list holds nothing
    path = write(tmp_path, "sg.json", recs)
    ds = read_dataset(path)
    note = f"{path}: fields nanolisa does not use, ignored: conversations[].weight (1 of 2 records), " \
           "id (2 of 2 records), images (1 of 2 records), source (1 of 2 records)"
    assert ds.notes == [note] and capsys.readouterr().err == f"note: {note}\n"
    assert len(tokenize_dataset(ds, tok, 64, cache_dir=False)) == 2


def test_txt_note_says_which_rule_applied(tmp_path, capsys):
    wiki = "\n".join(f"Article {i} is about topic {i}." for i in range(30)) + "\n"
    path = write(tmp_path, "wiki_demo.txt", wiki)
    ds = read_dataset(path)
    assert len(ds) == 1 and ds.instances[0]["text"] == wiki.strip("\n")
    assert capsys.readouterr().err == (
        f"note: {path}: plain text, one document per blank-line-separated block: 1 document from 30 non-empty "
        "lines; for one document per line, give a .jsonl of {\"text\": ...} records instead\n")
    lines = write(tmp_path, "lines.jsonl", [{"text": line} for line in wiki.split("\n") if line], jsonl=True)
    assert len(read_dataset(lines)) == 30


# ---- counts --------------------------------------------------------------------------------------------------------
def test_counts_line_for_a_mixed_file(tmp_path, tok):
    """Kept whole, kept truncated, dropped empty, dropped with no loss token left; also through the cache."""
    recs = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b" * 100}]},
            {"messages": [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "c"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}]
    path = write(tmp_path, "mixed.jsonl", recs, jsonl=True)
    ds = read_dataset(path)
    line = (f"{path}: 4 records read, 2 kept (1 truncated to --seq-len 40), 2 dropped (1 empty, nothing to train on; "
            "1 with no loss-bearing token within --seq-len 40)")
    for _ in range(2):  # the second time from the cache
        td = tokenize_dataset(ds, tok, 40, template="empty_no_special_tokens", cache_dir=str(tmp_path / "c"))
        assert td.summary() == line
        assert td.counts() == {"read": 4, "kept": 2, "truncated": 1, "dropped": {"empty": 1, "truncated": 1}}
    # the reliability issue's case: 12 read, 6 dropped for having no loss token left, 6 kept whole
    t2t = [{"input": "x" * 80, "output": "y"}] * 6 + [{"input": "a", "output": "b"}] * 6
    td = tokenize_dataset(read_dataset(write(tmp_path, "t2t.jsonl", t2t, jsonl=True)), tok, 64, cache_dir=False)
    assert td.summary().endswith("12 records read, 6 kept (0 truncated to --seq-len 64), 6 dropped "
                                 "(6 with no loss-bearing token within --seq-len 64)")
    # wikitext's empty texts are counted, not lost without a word
    wt = [{"text": ""}, {"text": "A line."}, {"text": ""}]
    td = tokenize_dataset(read_dataset(write(tmp_path, "wt.json", wt)), tok, 64, cache_dir=False)
    assert td.summary().endswith("3 records read, 1 kept (0 truncated to --seq-len 64), 2 dropped "
                                 "(2 empty, nothing to train on)")


# ---- reliability -----------------------------------------------------------------------------------------------
def test_jsonl_lines_split_at_newline_only(tmp_path, tok):
    text = "one\u2028two\u2029three\x85four\x0cfive"  # valid in a JSON string; Python's splitlines breaks on all
    path = write(tmp_path, "u.jsonl", [{"text": text}, {"text": "next"}], jsonl=True)
    ds = read_dataset(path)
    assert [x["text"] for x in ds.instances] == [text, "next"]


def test_tokenization_is_bounded_by_seq_len(tmp_path, tok, monkeypatch):
    """A 5 MB line costs what a seq_len line costs, and gives the same tokens as tokenizing all of it."""
    big = "".join(chr(97 + (i * 7919) % 26) + (" " if i % 5 == 0 else "") for i in range(5_000_000))[:5_000_000]
    recs = [{"text": big}, {"text": "short"}]
    conv = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": big}]},
            {"messages": [{"role": "user", "content": big}, {"role": "assistant", "content": "a"}]}]
    seen = []
    real = tok.backend.encode_batch
    monkeypatch.setattr(tok.backend, "encode_batch", lambda texts, **kw: seen.extend(map(len, texts)) or
                        real(texts, **kw))
    td = tokenize_dataset(read_dataset(write(tmp_path, "big.jsonl", recs, jsonl=True)), tok, 64, cache_dir=False)
    assert td.examples[0][0] == tok.encode(big[:1000])[:64] and td.num_truncated == 1
    tc = tokenize_dataset(read_dataset(write(tmp_path, "bigc.jsonl", conv, jsonl=True)), tok, 64, cache_dir=False)
    assert len(tc) == 1 and tc.summary().endswith("1 dropped (1 with no loss-bearing token within --seq-len 64)")
    full = tok.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n" + big[:1000], add_special_tokens=False)
    assert tc.examples[0][0] == full[:64]
    assert max(seen) <= (64 + 64) * 16  # (seq_len + 64) spans of the longest token (<|im_start|>: 12 chars)


# ---- the command line: exit 2, one line, no traceback ------------------------------------------------------------
def run_train(tmp_path, *args):
    return run_script("train.py", "--out", str(tmp_path / "o"), "--steps", "1", "--no-plot", *args)


NOT_UTF8 = b'{"type": "text_only", "instances": [{"text": "\xff"}]}'


def data_dir(tmp_path, name, content):
    d = tmp_path / "d"
    d.mkdir()
    write(d, "a.json", {"type": "text_only", "instances": [{"text": "x"}]})
    (d / name).mkdir() if content is None else write(d, name, content)
    return str(d)


@pytest.mark.parametrize("case", ["media", "surrogate", "nested", "hostile_template", "dir_not_utf8", "dir_subdir"])
def test_train_refuses_in_one_line(tmp_path, case):
    data = {"media": lambda: write(tmp_path, "m.json", [{"messages": MSGS, "images": ["a.jpg"]}]),
            "surrogate": lambda: write(tmp_path, "s.json", '[{"text": "\\ud800"}]'),
            "nested": lambda: write(tmp_path, "n.json", "[" * 100000 + "]" * 100000),
            "hostile_template": lambda: write(tmp_path, "c.json", [{"messages": MSGS}]),
            "dir_not_utf8": lambda: data_dir(tmp_path, "b.json", NOT_UTF8),
            "dir_subdir": lambda: data_dir(tmp_path, "x.json", None)}[case]()
    extra = ["--template", "{{ 'x' * 10**11 }}"] if case == "hostile_template" else []
    p = run_train(tmp_path, "--data", data, *extra)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: ") and not (tmp_path / "o").exists()


def test_train_on_tool_calls_prints_the_notes_and_the_counts(tmp_path):
    rec = {"id": 1, "conversations": [{"from": "human", "value": "Weather in Paris?"},
                                      {"from": "function_call", "value": json.dumps(CALL)},
                                      {"from": "observation", "value": "20 C"}, {"from": "gpt", "value": "20 C."}],
           "tools": json.dumps([TOOL])}
    data = write(tmp_path, "glaive.json", [rec, rec])
    p = run_train(tmp_path, "--data", data, "--template", "chatml", "--seq-len", "1024", "--batch-size", "1")
    assert p.returncode == 0, p.stderr
    assert f"note: {data}: fields nanolisa does not use, ignored: id (2 of 2 records)\n" in p.stderr
    assert f"note: {data}: 2 records read, 2 kept (0 truncated to --seq-len 1024), 0 dropped\n" in p.stderr
