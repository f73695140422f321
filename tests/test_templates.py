"""Chat templates and loss masks.

For every preset (and a custom Jinja template) a 3-turn conversation with a system prompt is tokenized, and
the labelled tokens are decoded run by run: each run must be exactly one assistant reply followed by the
end-of-turn marker its model family writes (and nothing of the system/user text or the assistant header).
Rendering is checked against transformers' apply_chat_template, and the masks against transformers'
own `{% generation %}` assistant masks.
"""
import json
import os
import re

import pytest

from nanolisa import templates
from nanolisa.errors import UserError
from nanolisa.templates import PRESETS, render_chat, resolve_template, tokenize_chat
from nanolisa.tokenizer import TINY_DIR, load_tokenizer
from tests.helpers import labelled_runs

transformers = pytest.importorskip("transformers")

SYSTEM = "You are terse."
TURNS = [("What is 12+7?", "19"),
         ("Reverse: abc. Say assistant or user!", "cba, said the assistant."),
         ("Unicode? 世界", "Oui: ünï 🙂\nsecond line")]


def conversation(system=True):
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for u, a in TURNS:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


# What each family writes after an assistant reply to close the turn (the tiny tokenizer's EOS is </s>).
END_OF_TURN = {"llama2": " </s>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>", "yi": "<|im_end|>",
               "qwen2": "<|im_end|>", "qwen2_5": "<|im_end|>", "phi3": "<|end|>", "gemma": "<end_of_turn>",
               "zephyr": "</s>", "deepseek": "</s>", "deepseek_v2": "</s>", "yi1_5": "<|im_end|>",
               "internlm2": "<|im_end|>", "mistral": "</s>", "empty": "</s>", "disable": "</s>",
               "empty_no_special_tokens": ""}
NO_SYSTEM = ("empty", "disable", "empty_no_special_tokens")  # as LMFlow's, these have no place for one
# Turn markers made single special tokens in the "with_specials" tokenizer (as in the real models).
MARKERS = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end|>", "<|user|>", "<|assistant|>",
           "<|system|>", "<start_of_turn>", "<end_of_turn>"]


@pytest.fixture(params=["bytes", "with_specials"])
def tok(request):
    t = load_tokenizer(TINY_DIR)
    if request.param == "with_specials":
        from tokenizers import AddedToken
        t.backend.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS])
    return t


def test_every_family_has_a_preset():
    assert set(PRESETS) == set(END_OF_TURN)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_masks_exactly_assistant_replies_and_end_of_turn(name, tok):
    msgs = conversation(system=name not in NO_SYSTEM)
    ids, labels = tokenize_chat(msgs, tok, template=name)
    assert len(ids) == len(labels)
    runs = labelled_runs(ids, labels)
    expected = [a + END_OF_TURN[name] for _, a in TURNS]
    assert [tok.decode(r) for r in runs] == expected
    # every unlabelled token is prompt: decoding them gives back the rest of the text, no reply inside
    text = render_chat(msgs, tok, template=name)
    assert tok.decode(ids) == text
    assert ids == tok.encode(text, add_special_tokens=False)
    # train_on_prompt: everything is a target
    ids2, labels2 = tokenize_chat(msgs, tok, template=name, train_on_prompt=True)
    assert ids2 == ids and labels2 == ids


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_render_matches_transformers_apply_chat_template(name, tmp_path):
    src = PRESETS[name]
    cfg = json.load(open(os.path.join(TINY_DIR, "tokenizer_config.json")))
    cfg["chat_template"] = src
    for f in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / f).write_text(open(os.path.join(TINY_DIR, f)).read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = load_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = conversation(system=name not in NO_SYSTEM)
    for gen in (False, True):
        prompt = msgs[:-1] if gen else msgs
        assert render_chat(prompt, ours, add_generation_prompt=gen) == \
            ref.apply_chat_template(prompt, tokenize=False, add_generation_prompt=gen)
    assert tokenize_chat(msgs, ours)[0] == ref.encode(ref.apply_chat_template(msgs, tokenize=False),
                                                       add_special_tokens=False)
    if name in templates.TOOL_PRESETS:  # and with tools, a call and its result
        for gen in (False, True):
            prompt = tool_conversation()[:4] if gen else tool_conversation()
            assert render_chat(prompt, ours, add_generation_prompt=gen, tools=TOOLS) == \
                ref.apply_chat_template(prompt, tools=TOOLS, tokenize=False, add_generation_prompt=gen)


# A custom template that marks the assistant's target with {% generation %}: transformers then computes
# its own assistant mask, an independent oracle for ours.
CUSTOM = ("{{ bos_token }}{% for m in messages %}"
          "{% if m['role'] == 'assistant' %}{{ '### Assistant:\n' }}{% generation %}{{ m['content'] | trim + eos_token }}{% endgeneration %}{{ '\n\n' }}"
          "{% else %}{{ '### ' + m['role'] | capitalize + ':\n' + m['content'] | trim + '\n\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}")


def test_custom_template_mask_matches_transformers_generation_mask(tok, tmp_path):
    tok.save(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = conversation()
    ids, labels = tokenize_chat(msgs, tok, template=CUSTOM)
    out = ref.apply_chat_template(msgs, chat_template=CUSTOM, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == [int(l != -100) for l in labels]
    assert [tok.decode(r) for r in labelled_runs(ids, labels)] == [a + "</s>" for _, a in TURNS]


def test_model_own_template_is_the_default(tok):
    msgs = conversation()
    assert tokenize_chat(msgs, tok) == tokenize_chat(msgs, tok, template="chatml")
    runs = labelled_runs(*tokenize_chat(msgs, tok))
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for _, a in TURNS]


def test_stripped_content_and_sentencepiece_offsets(tmp_path):
    """llama2 strips contents; a SentencePiece tokenizer's "▁" tokens carry the space before a reply."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"{u} {a} [INST] [/INST] <<SYS>>" for u, a in TURNS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=330, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False}))
    tok = load_tokenizer(str(tmp_path))
    msgs = conversation()
    msgs[2]["content"] = "  " + msgs[2]["content"] + " \n"
    ids, labels = tokenize_chat(msgs, tok, template="llama2")
    runs = labelled_runs(ids, labels)
    assert [tok.decode(r).strip() for r in runs] == [a.strip() + " </s>" for _, a in TURNS]
    assert sum(i == tok.bos_token_id for i in ids) == 3 and all(l != tok.bos_token_id for l in labels)


def test_errors_are_user_errors(tok):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(UserError, match="alternate"):
        tokenize_chat(bad, tok, template="llama2")
    with pytest.raises(UserError, match="unknown chat template"):
        tokenize_chat(conversation(), tok, template="nope")
    with pytest.raises(UserError, match="does not parse"):
        render_chat(conversation(), tok, template="{% for %}")
    with pytest.raises(UserError, match="Boom"):
        render_chat(conversation(), tok, template="{{ raise_exception('Boom') }}")


def test_sandbox_blocks_python_internals(tok):
    with pytest.raises(UserError, match="unsafe"):
        render_chat(conversation(), tok, template="{{ messages.__class__.__mro__[1].__subclasses__() }}")


# ---- LMFlow's templates, string by string ----------------------------------------------------------------
# What LMFlow's --conversation_template NAME writes for [system,] user, assistant, ... (its formatters in
# src/lmflow/utils/conversation_template/, transcribed as (starter, system, user, assistant, stopper), with
# {} for the content and the tiny tokenizer's <s> / </s> for bos_token / eos_token). LMFlow's llama2 and zephyr
# formatters depend on the turn; those are spelled out in lmflow_render.
_CHATML = ("", "<|im_start|>system\n{}<|im_end|>\n", "<|im_start|>user\n{}<|im_end|>\n",
           "<|im_start|>assistant\n{}<|im_end|>\n", "")
LMFLOW = {
    "chatml": _CHATML, "yi": _CHATML, "qwen2": _CHATML,
    "internlm2": ("<s>",) + _CHATML[1:],
    "yi1_5": ("", "{}", "<|im_start|>user\n{}<|im_end|>\n", "<|im_start|>assistant\n{}<|im_end|>\n", ""),
    "llama3": ("<s>", "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
               "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n{}<|eot_id|>", ""),
    "phi3": ("<s>", "<|system|>\n{}<|end|>\n", "<|user|>\n{}<|end|>\n", "<|assistant|>\n{}<|end|>\n", "</s>"),
    "gemma": ("<s>", "{}", "<start_of_turn>user\n{}<end_of_turn>\n", "<start_of_turn>model\n{}<end_of_turn>\n", ""),
    "deepseek": ("<s>", "{}\n\n", "User: {}\n\n", "Assistant: {}</s>", ""),
    "deepseek_v2": ("<s>", "{}\n\n", "User: {}\n\n", "Assistant: {}</s>", ""),
    "empty": ("", None, "<s>{}", "{}</s>", ""), "disable": ("", None, "<s>{}", "{}</s>", ""),
    "empty_no_special_tokens": ("", None, "{}", "{}", ""),
}


def lmflow_render(name, system, turns):
    if name == "llama2":  # the system block goes into the first user message; bos before each [INST]
        sys_text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return "".join(f"<s>[INST] {sys_text if i == 0 else ''}{u} [/INST]{a}</s>" for i, (u, a) in enumerate(turns))
    if name == "zephyr":  # "\n" before each turn, except the first when there is no system prompt
        out = f"<|system|>\n{system}</s>" if system else ""
        for i, (u, a) in enumerate(turns):
            out += ("\n" if (i or system) else "") + f"<|user|>\n{u}</s>\n<|assistant|>\n{a}</s>"
        return out
    start, sys_f, user_f, asst_f, stop = LMFLOW[name]
    return (start + (sys_f.format(system) if system else "")
            + "".join(user_f.format(u) + asst_f.format(a) for u, a in turns) + stop)


def test_presets_write_what_lmflow_writes_except_the_documented_differences(tok):
    """Same name, same text, except where the model's own template and LMFlow disagree; those are the rows of
    docs/data.md, checked here difference by difference."""
    for system in (SYSTEM, None):
        msgs = conversation(system=system is not None)
        for name in sorted(set(LMFLOW) | {"llama2", "zephyr"}):
            if system and name in NO_SYSTEM:
                continue
            ours, theirs = render_chat(msgs, tok, name), lmflow_render(name, system, TURNS)
            if name == "qwen2" and system is None:  # Qwen's own template adds its default system prompt
                assert ours == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + theirs
            elif name == "gemma" and system:  # Gemma's own template folds it into the first user turn
                u0 = TURNS[0][0]
                assert ours == theirs.replace(SYSTEM + "<start_of_turn>user\n" + u0,
                                              "<start_of_turn>user\n" + SYSTEM + "\n\n" + u0)
            elif name == "llama2":  # Meta's template: " reply </s>" (LMFlow's tokenizer adds the first space)
                for _, a in TURNS:
                    theirs = theirs.replace(f"[/INST]{a}</s>", f"[/INST] {a} </s>")
                assert ours == theirs
            elif name == "zephyr":  # Zephyr's template ends every turn with "\n", the last one too
                assert ours == theirs + "\n"
            else:
                assert ours == theirs, name
    # llama3 (Meta's template) trims each content; LMFlow's writes it as is
    padded = [{"role": "user", "content": " hi\n"}, {"role": "assistant", "content": "\tyo "}]
    assert render_chat(padded, tok, "llama3") == lmflow_render("llama3", None, [("hi", "yo")])
    assert lmflow_render("llama3", None, [(" hi\n", "\tyo ")]) != lmflow_render("llama3", None, [("hi", "yo")])
    # the qwen2_5 preset is Qwen2.5's template (LMFlow's qwen2_5 is the same Jinja)
    assert render_chat(conversation(False), tok, "qwen2_5").startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


def test_empty_trains_its_eos_and_refuses_a_system_prompt(tok):
    msgs = conversation(system=False)
    ids, labels = tokenize_chat(msgs, tok, "empty")
    assert tok.decode(ids) == "".join(f"<s>{u}{a}</s>" for u, a in TURNS)
    assert [tok.decode(r) for r in labelled_runs(ids, labels)] == [a + "</s>" for _, a in TURNS]
    assert tokenize_chat(msgs, tok, "disable") == (ids, labels)
    ids, labels = tokenize_chat(msgs, tok, "empty_no_special_tokens")
    assert tok.decode(ids) == "".join(u + a for u, a in TURNS)
    for name in NO_SYSTEM:
        with pytest.raises(UserError, match="has no place for a system message") as e:
            tokenize_chat(conversation(), tok, name)
        assert "\n" not in str(e.value)


def test_lmflow_names_nanolisa_lacks_say_what_to_use(tok):
    with pytest.raises(UserError, match="qwen2 writes them as the model's own template does"):
        resolve_template(tok, "qwen2_for_tool")
    with pytest.raises(UserError, match="unknown chat template 'chatglm3'.*empty_no_special_tokens"):
        resolve_template(tok, "chatglm3")


# ---- tool calls -------------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def tool_conversation():
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "content": '{"temp": 20}'},
            {"role": "assistant", "content": "It is 20 C."},
            {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]


QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
TOOL_TARGETS = {"chatml": QWEN_CALL, "yi": QWEN_CALL, "qwen2": QWEN_CALL, "qwen2_5": QWEN_CALL,
                "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'}


@pytest.mark.parametrize("name", sorted(TOOL_TARGETS))
def test_tool_presets_train_the_call_and_not_the_result(name, tok):
    msgs = tool_conversation()
    ids, labels = tokenize_chat(msgs, tok, name, tools=TOOLS)
    eot = END_OF_TURN[name]
    assert [tok.decode(r) for r in labelled_runs(ids, labels)] == \
        [TOOL_TARGETS[name], "It is 20 C." + eot, "You are welcome." + eot]
    text = render_chat(msgs, tok, name, tools=TOOLS)
    assert tok.decode(ids) == text and '"description": "Weather of a city"' in text
    result = {"llama3": '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temp\\": 20}"<|eot_id|>'}.get(
        name, '<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response><|im_end|>\n')
    assert result in text  # the tool result is there, as prompt


def test_tool_presets_match_the_model_families_own_templates(tok):
    """Full text for Qwen2.5's format (system prompt, tools block, call, result) and Llama 3.1's."""
    msgs = tool_conversation()[:5]
    qwen = render_chat(msgs, tok, "qwen2_5", tools=TOOLS)
    assert qwen == (
        "<|im_start|>system\nYou are terse.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(TOOLS[0]) + "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n" + QWEN_CALL + "\n<|im_start|>user\n<tool_response>\n{\"temp\": 20}\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\nIt is 20 C.<|im_end|>\n")
    llama = render_chat(msgs, tok, "llama3", tools=TOOLS)
    assert llama.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge "
                            "Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
                            "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions")
    assert json.dumps(TOOLS[0], indent=4) + "\n\nWeather in Paris?<|eot_id|>" in llama
    # without tools the presets are the plain formats (LMFlow's llama3, Qwen2's ChatML)
    assert render_chat(conversation(), tok, "llama3") == lmflow_render("llama3", SYSTEM, TURNS)


# A model's own template with a tool format, marking what the assistant writes with {% generation %}, so that
# transformers' assistant mask is an independent oracle for ours.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}{{ '[TOOLS]' + tools | tojson + '[/TOOLS]\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}{{ '<<A>> ' }}{% generation %}"
    "{% for c in m.tool_calls %}{{ '[CALL]' + c.function.name + ' ' + c.function.arguments | tojson }}{% endfor %}"
    "{{ eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% elif m.role == 'assistant' %}{{ '<<A>> ' }}{% generation %}{{ m.content + eos_token }}{% endgeneration %}"
    "{{ '\n' }}{% elif m.role == 'tool' %}{{ '<<R>> ' + m.content + '\n' }}"
    "{% else %}{{ '<<' + m.role[0] | upper + '>> ' + m.content + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<<A>> ' }}{% endif %}")


def test_model_template_with_tools_matches_transformers(tok, tmp_path):
    tok.chat_template = TOOL_TEMPLATE
    tok.save(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = tool_conversation()
    assert render_chat(msgs, tok, tools=TOOLS) == ref.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
    ids, labels = tokenize_chat(msgs, tok, tools=TOOLS)
    out = ref.apply_chat_template(msgs, tools=TOOLS, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == [int(l != -100) for l in labels]
    assert [tok.decode(r) for r in labelled_runs(ids, labels)] == \
        ['[CALL]get_weather {"city": "Paris"}</s>', "It is 20 C.</s>", "You are welcome.</s>"]


def test_tool_data_with_a_template_that_cannot_write_it_is_refused(tok):
    msgs = tool_conversation()
    cases = [("llama2", "template 'llama2' has no format for tool calls"),
             (None, "does template 'model' support them"),  # the tiny model's ChatML ignores tools
             ("{{ tools | tojson }}{% for m in messages %}{% if m.role != 'tool' %}"
              "{{ m.role + ': ' + (m.content or '') + eos_token }}{% endif %}{% endfor %}",
              "leaves out message 3 \\(tool\\)"),
             ("{{ tools | tojson }}{% for m in messages %}{{ m.role + ': ' + (m.content or '') + eos_token }}"
              "{% endfor %}", "does not write the tool call 'get_weather' of message 2"),
             ("{% for m in messages %}{{ m.role + ': ' + (m.content or '') + eos_token }}{% endfor %}"
              "{{ tools | tojson }}", "writes the conversation differently when it ends at message 2"),
             ("{% for m in messages %}{{ m.role + ': ' + (m.content or '') + ((m.tool_calls or []) | tojson) }}"
              "{{ eos_token }}{% endfor %}", "ignores the tool definitions")]
    for template, message in cases:
        with pytest.raises(UserError, match=message) as e:
            tokenize_chat(msgs, tok, template, tools=TOOLS)
        assert "\n" not in str(e.value)


# ---- hostile templates ---------------------------------------------------------------------------------------
HOSTILE = {
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "took more than",
    "{{ 'x' * 10**11 }}": "repeating a str",
    "{{ ['x'] * 10**11 }}": "repeating a list",
    "{{ 'x' | center(10**11) }}": "the filter center",
    "{{ 'x'.ljust(10**11) }}": "given to ljust",
    "{{ '%*s' % (10**11, 'x') }}": "%-format",
    "{{ 2 ** 100000000 }}": "the exponent",
    "{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}": "wrote more than",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}": "RecursionError",
    "{{ messages[0].content + 1 }}": "TypeError",
}


@pytest.mark.parametrize("source", sorted(HOSTILE))
def test_hostile_template_is_one_line_not_a_hang_or_a_traceback(source, tok, monkeypatch):
    monkeypatch.setattr(templates, "RENDER_SECONDS", 1.0)
    with pytest.raises(UserError, match=re.escape(HOSTILE[source])) as e:
        render_chat(conversation(), tok, template=source)
    assert "\n" not in str(e.value)


# ---- the families' own templates, as published -------------------------------------------------------------
# Written here as data, character for character, from llama.cpp's copies of the checkpoints' templates
# (github.com/ggml-org/llama.cpp, models/templates/): Qwen-Qwen3-0.6B.jinja, google-gemma-2-2b-it.jinja,
# microsoft-Phi-3.5-mini-instruct.jinja; Gemma 3's from google/gemma-3-1b-it's tokenizer_config.json (the
# same text as quoted in several public repositories; llama.cpp keeps no copy of it).
QWEN3 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n    {{- \"# Tools\\n\\nYou may call one or more "
    "functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> "
    "XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n"
    "    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0].content + "
    "'<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') "
    "and message.content.endswith('</tool_response>')) %}\n        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not "
    "loop.first) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {%- set content = message.content %}\n"
    "        {%- set reasoning_content = '' %}\n        {%- if message.reasoning_content is defined and "
    "message.reasoning_content is not none %}\n            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n            {%- endif %}\n        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n            {%- if loop.last or (not loop.last and "
    "reasoning_content) %}\n                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + "
    "reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n"
    "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n                    {{- '\\n' }}\n"
    "                {%- endif %}\n                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}")
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA3 = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\\n'}}\n{%- endif -%}\n")
PHI35 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
FAMILY_MARKERS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<start_of_turn>", "<end_of_turn>",
                  "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
THINK = [("What is 12+7?", "<think>\nAdd the units.\n</think>\n\n19"),
         ("And 3*3?", "<think>\nA square.\n</think>\n\n9"),
         ("Unicode? 世界", "<think>\nJust greet.\n</think>\n\nOui: ünï 🙂")]


def family_tokenizer(tmp_path, source):
    """The tiny tokenizer with the families' turn markers as special tokens and `source` as its chat template,
    saved, and loaded by nanolisa and by transformers."""
    from tokenizers import AddedToken
    t = load_tokenizer(TINY_DIR)
    t.backend.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in FAMILY_MARKERS])
    t.save(str(tmp_path))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = source
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))


def chat(turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


@pytest.mark.parametrize("source,system,end", [(GEMMA2, False, "<end_of_turn>"), (GEMMA3, True, "<end_of_turn>"),
                                               (PHI35, True, "<|end|>"), (QWEN3, True, "<|im_end|>")])
def test_family_templates_as_published_mask_the_replies(source, system, end, tmp_path):
    ours, ref = family_tokenizer(tmp_path, source)
    msgs = chat(TURNS, SYSTEM if system else None)
    for gen in (False, True):
        prompt = msgs[:-1] if gen else msgs
        assert render_chat(prompt, ours, add_generation_prompt=gen) == \
            ref.apply_chat_template(prompt, tokenize=False, add_generation_prompt=gen)
    ids, labels = tokenize_chat(msgs, ours)
    assert ids == ref.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    # each reply and its end of turn, nothing of "<start_of_turn>model", "<|assistant|>", ... (Qwen3 writes an
    # empty <think> block before the last reply: prompt, as the non-thinking generation prompt writes it)
    assert [ours.decode(r) for r in labelled_runs(ids, labels)] == [a.strip() + end for _, a in TURNS]


def test_gemma2_refuses_a_system_role_in_one_line(tmp_path):
    ours, _ = family_tokenizer(tmp_path, GEMMA2)
    with pytest.raises(UserError, match="^chat template error: System role not supported$"):
        tokenize_chat(chat(TURNS, SYSTEM), ours)


def test_qwen3_trains_the_reasoning_it_keeps_and_not_the_reasoning_it_drops(tmp_path):
    """Qwen3's template keeps the <think> block only in replies after the last user turn and drops it from
    earlier ones: those are trained as "answer<|im_end|>", the last as the whole block and answer -- what the
    model generates after "<|im_start|>assistant\\n"."""
    ours, ref = family_tokenizer(tmp_path, QWEN3)
    msgs = chat(THINK, SYSTEM)
    text = render_chat(msgs, ours)
    assert text == ref.apply_chat_template(msgs, tokenize=False)
    assert "Add the units" not in text and "A square" not in text and "Just greet" in text  # as the template does
    ids, labels = tokenize_chat(msgs, ours)
    runs = [ours.decode(r) for r in labelled_runs(ids, labels)]
    assert runs == ["19<|im_end|>", "9<|im_end|>", "<think>\nJust greet.\n</think>\n\nOui: ünï 🙂<|im_end|>"]
    # a multi-step tool turn after the last user message keeps its reasoning too
    steps = msgs[:-1] + [{"role": "assistant", "content": "<think>\nLook it up.\n</think>\n\nChecking.",
                          "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                            "arguments": {"city": "Oslo"}}}]},
                         {"role": "tool", "content": "{\"temp\": 3}"},
                         {"role": "assistant", "content": "<think>\nCold.\n</think>\n\n3 degrees."}]
    ids, labels = tokenize_chat(steps, ours, tools=TOOLS)
    assert ids == ref.apply_chat_template(steps, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    runs = [ours.decode(r) for r in labelled_runs(ids, labels)]
    assert runs[2:] == ["<think>\nLook it up.\n</think>\n\nChecking.\n<tool_call>\n{\"name\": \"get_weather\", "
                        "\"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|im_end|>",
                        "<think>\nCold.\n</think>\n\n3 degrees.<|im_end|>"]
