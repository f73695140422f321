"""Chat templates: turn a conversation into one string, and into (input_ids, labels) for fine-tuning.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`. A chat
template is a Jinja program that writes it the way a model family was trained to read it, e.g. ChatML:

    <|im_start|>user\\nWhat is 2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n

Where the template comes from (`template=` argument):
  * None: the model's own `chat_template` from its tokenizer_config.json / chat_template.jinja;
  * a preset name matching LMFlow's `--conversation_template` names: llama2, llama3, chatml, qwen2, phi3,
    gemma, zephyr, deepseek, yi1_5, internlm2, mistral, empty (contents concatenated);
  * a Jinja string, or the path of a .jinja file.

Templates are rendered in jinja2's ImmutableSandboxedEnvironment with the same settings and helpers as
transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, `raise_exception`, a non-escaping `tojson`,
`strftime_now`, the tokenizer's special tokens as `bos_token`, `eos_token`, ...). A template shipped with a
checkpoint is untrusted code: the sandbox never lets it touch Python internals, and we never import or run
any Python file from a checkpoint.

Loss masks. Fine-tuning a chat model trains only on what the assistant says, *including the token that ends
its turn* (<|im_end|>, <|eot_id|>, </s>, ...), or the model never learns to stop. Getting this wrong is a
classic silent bug (axolotl #1761 trained only on the last assistant turn; LMFlow #663). We find the
assistant spans exactly, for any template, without parsing it:

  1. render the conversation once with each message's content replaced by a unique placeholder; the text
     between placeholders is what the template adds (headers, separators, end-of-turn markers);
  2. put the real contents back (allowing for templates that `strip`/`trim` them), checking the result is
     character-for-character the real rendering;
  3. an assistant span runs from the first character of its content to the end of the first end-of-turn
     marker (EOS or a known turn-closing token) the template writes after it, e.g. "4<|im_end|>"; the "\\n"
     after <|im_end|> and the next turn's header are prompt, not target;
  4. tokenize the whole string once with character offsets and give a label to every token that overlaps
     an assistant span (as transformers does for `{% generation %}` masks). Labels are aligned with
     input_ids (Hugging Face convention: the loss shifts them by one).
"""
from __future__ import annotations

import bisect
import json
import os
import re
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanolisa.errors import UserError
from nanolisa.loss import IGNORE_INDEX
from nanolisa.tokenizer import END_OF_TURN_TOKENS


# ---- presets: each family's official template ---------------------------------------------------------
# Written as in the models' own tokenizer_config.json files (where a family's template cannot hold a system
# message, the system prompt is prepended to the first user message, as LLaMA-Factory and LMFlow do).

_ALTERNATE = ("{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}")

_SYSTEM_INTO_FIRST_USER = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = none %}{% endif %}")

PRESETS: dict[str, str] = {
    # Llama 2 chat (meta-llama/Llama-2-7b-chat-hf): [INST] ... [/INST] answer </s>, system in <<SYS>>.
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}" + _ALTERNATE +
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"),
    # Llama 3 instruct (meta-llama/Meta-Llama-3-8B-Instruct).
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    # ChatML (Yi, OpenHermes, ...): no default system prompt.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Qwen1.5 / Qwen2 instruct: ChatML with Qwen's default system prompt.
    "qwen2": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Phi-3 (microsoft/Phi-3-mini-4k-instruct).
    "phi3": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"),
    # Gemma instruct (google/gemma-7b-it): the assistant is called "model"; no system role.
    "gemma": (
        "{{ bos_token }}" + _SYSTEM_INTO_FIRST_USER +
        "{% for message in loop_messages %}" + _ALTERNATE +
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
        "{% if loop.first and system_message is not none %}{% set content = system_message + '\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + content | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
    # Zephyr (HuggingFaceH4/zephyr-7b-beta).
    "zephyr": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"),
    # DeepSeek LLM chat (deepseek-ai/deepseek-llm-7b-chat).
    "deepseek": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"),
    # Yi-1.5 chat (01-ai/Yi-1.5-9B-Chat): system text first, ChatML turns, the assistant header follows
    # every user turn.
    "yi1_5": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
        "{% endfor %}"),
    # InternLM2 chat (internlm/internlm2-chat-7b): BOS then ChatML.
    "internlm2": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Mistral instruct v0.1/v0.2 (mistralai/Mistral-7B-Instruct-v0.2); no system role.
    "mistral": (
        "{{ bos_token }}" + _SYSTEM_INTO_FIRST_USER +
        "{% for message in loop_messages %}" + _ALTERNATE +
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system_message is not none %}{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
    # LMFlow's `empty`: the contents, concatenated, nothing added.
    "empty": "{% for message in messages %}{{ message['content'] }}{% endfor %}",
}

# End-of-turn strings a preset writes after assistant content (besides the tokenizer's EOS).
PRESET_END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "qwen2": "<|im_end|>", "phi3": "<|end|>",
                      "gemma": "<end_of_turn>", "yi1_5": "<|im_end|>", "internlm2": "<|im_end|>"}


# ---- the sandboxed Jinja environment (as transformers' _compile_jinja_template) ------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used by some HF templates to mark assistant text): render
    the body unchanged. We compute masks ourselves, so the tag only needs to parse."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def resolve_template(tokenizer, template: str | None = None) -> tuple[str, str]:
    """(name, jinja source) of the template to use: a preset name, a .jinja file, a Jinja string, or the
    tokenizer's own chat_template when `template` is None."""
    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat_template; choose one with --template "
                            f"({', '.join(PRESETS)}) or give a Jinja template")
        return "model", tokenizer.chat_template
    if template in PRESETS:
        return template, PRESETS[template]
    if "{{" in template or "{%" in template:
        return "custom", template
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return os.path.basename(template), f.read()
    raise UserError(f"unknown chat template {template!r}: use one of {', '.join(PRESETS)}, "
                    "a Jinja string, or the path of a .jinja file")


def _special_tokens(tokenizer) -> dict[str, str]:
    """What transformers passes to the template as variables: its named special tokens that are set."""
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            out[name] = value
    return out


def _render(source: str, messages: list[dict], tokenizer, add_generation_prompt: bool, tools=None) -> str:
    try:
        return compile_template(source).render(messages=messages, tools=tools, documents=None,
                                                add_generation_prompt=add_generation_prompt,
                                                **_special_tokens(tokenizer))
    except jinja2.TemplateError as e:
        raise UserError(f"chat template error: {e}") from None


def render_chat(messages: list[dict], tokenizer, template: str | None = None, add_generation_prompt: bool = False,
                tools: list | None = None) -> str:
    """The conversation as the template writes it (same string as transformers' apply_chat_template
    with tokenize=False)."""
    _, source = resolve_template(tokenizer, template)
    return _render(source, messages, tokenizer, add_generation_prompt, tools)


# ---- assistant spans and labels ----------------------------------------------------------------------
_PH = re.compile("\ue000(\\d+)\ue001")  # placeholder for message i: private-use characters around i


def _end_markers(tokenizer, name: str) -> list[str]:
    markers = [m for m in (getattr(tokenizer, "eos_token", None), PRESET_END_OF_TURN.get(name)) if m]
    return markers + [t for t in END_OF_TURN_TOKENS if t not in markers]


def assistant_spans(messages: list[dict], tokenizer, template: str | None = None, tools: list | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character span of each assistant reply + its end-of-turn marker])."""
    name, source = resolve_template(tokenizer, template)
    text = _render(source, messages, tokenizer, False, tools)
    masked = [dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)]
    skeleton = _render(source, masked, tokenizer, False, tools)
    parts = _PH.split(skeleton)  # [seg0, idx0, seg1, idx1, seg2, ...]: template text between contents
    markers = _end_markers(tokenizer, name)
    spans, pos = [], len(parts[0])
    if not text.startswith(parts[0]):
        raise UserError(f"chat template {name!r} renders message contents in a way nanolisa cannot align")
    for k in range(1, len(parts), 2):
        i, seg = int(parts[k]), parts[k + 1]
        content = messages[i]["content"]
        # the template may have trimmed the content; take the variant that reproduces the real rendering
        for variant in (content, content.strip(), content.lstrip(), content.rstrip()):
            if text.startswith(variant + seg, pos):
                break
        else:
            raise UserError(f"chat template {name!r} rewrites message {i}'s content; nanolisa cannot "
                            "find the assistant text to train on (use a preset with --template)")
        start, end = pos, pos + len(variant)
        if messages[i]["role"] == "assistant":
            # the reply's target ends after the first end-of-turn marker the template writes after it
            found = [(seg.find(m), m) for m in markers if seg.find(m) >= 0]
            if found:
                at, m = min(found, key=lambda x: (x[0], -len(x[1])))
                end = end + at + len(m)
            if end > start:
                spans.append((start, end))
        pos = pos + len(variant) + len(seg)
    if pos != len(text):
        raise UserError(f"chat template {name!r} renders message contents in a way nanolisa cannot align")
    return text, spans


def labels_from_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Label every token whose characters overlap an assistant span; IGNORE_INDEX elsewhere.

    Token offsets are sorted, so the tokens overlapping span (s, e) are one contiguous run: from the first
    token ending after s to the last token starting before e. Two binary searches per span, then a slice
    copy, keep this fast on long examples (no Python loop over tokens)."""
    labels = [IGNORE_INDEX] * len(ids)
    for s, e in spans:
        lo = bisect.bisect_right(offsets, s, key=lambda o: o[1])   # first token with end > s
        hi = bisect.bisect_left(offsets, e, lo=lo, key=lambda o: o[0])  # first token with start >= e
        labels[lo:hi] = ids[lo:hi]
    return labels


def tokenize_chat(messages: list[dict], tokenizer, template: str | None = None, train_on_prompt: bool = False,
                  tools: list | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation. labels = input_ids on assistant replies (with their
    end-of-turn token), IGNORE_INDEX on everything else; with train_on_prompt, labels = input_ids everywhere.
    The rendered string is encoded without adding special tokens, as apply_chat_template does: templates
    that want a BOS write `bos_token` themselves."""
    text, spans = assistant_spans(messages, tokenizer, template, tools)
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
    if train_on_prompt:
        return list(ids), list(ids)
    return list(ids), labels_from_spans(ids, offsets, spans)
