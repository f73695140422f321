"""Chat templates: turn a conversation into one string, and into (input_ids, labels) for fine-tuning.

A conversation is a list of messages `{"role": "system"|"user"|"assistant"|"tool", "content": str}`, written
the way transformers' `apply_chat_template` takes them: an assistant message may carry `tool_calls`
(`[{"type": "function", "function": {"name", "arguments": {...}}}]`, content None or text) and a `tool`
message holds a tool's result; the tool definitions (JSON schemas) are passed beside the messages as `tools`.
A chat template is a Jinja program that writes a conversation the way a model family was trained to read it,
e.g. ChatML:

    <|im_start|>user\\nWhat is 2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n

Where the template comes from (`template=` argument):
  * None: the model's own `chat_template` from its tokenizer_config.json / chat_template.jinja;
  * a preset name. The names are LMFlow's `--conversation_template` names and a same-named preset writes
    what LMFlow's does, except where LMFlow and the model's own template disagree: there we follow the
    model (llama2, qwen2, gemma, ...; the table in docs/data.md says what differs and why). Presets:
    chatml, yi (= chatml), qwen2, qwen2_5, llama2, llama3, phi3, gemma, zephyr, deepseek, deepseek_v2
    (= deepseek), yi1_5, internlm2, mistral (not an LMFlow name: Mistral-7B-Instruct v0.1/v0.2), empty /
    disable (BOS before each user turn, EOS after each reply, as LMFlow's) and empty_no_special_tokens
    (the contents, concatenated);
  * a Jinja string, or the path of a .jinja file.

Tool calls. chatml, yi, qwen2 and qwen2_5 write tools as Qwen2.5's template does (a `# Tools` block with
the JSON schemas in the system turn, `<tool_call>` JSON in the assistant turn, results in `<tool_response>`
within a user turn); llama3 writes a conversation with tools as Llama 3.1's template does (schemas in the
first user turn, `{"name", "parameters"}` JSON calls, results in `ipython` turns). The other presets have no
tool format and refuse tool data; a model's own template gets `tools=` and the messages exactly as
apply_chat_template passes them. A template that ignores the tools, leaves out a message or does not
write a tool call is refused, never trained on with the data silently missing.

Templates are rendered in jinja2's ImmutableSandboxedEnvironment with the same settings and helpers as
transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, `raise_exception`, a non-escaping `tojson`,
`strftime_now`, the tokenizer's special tokens as `bos_token`, `eos_token`, ...). A template shipped with a
checkpoint is untrusted code: the sandbox never lets it touch Python internals, and we never import or run
any Python file from a checkpoint. Rendering is also bounded, so a hostile template fails in one line
instead of hanging or exhausting memory: `*` may build at most MAX_REPEAT items, calls and filters take no
size above MAX_REPEAT, `**` no exponent above 4096, the output of one conversation is capped (a few MB plus
4x its input), and one rendering may take RENDER_SECONDS (a SIGALRM timer; only in the main thread on Unix).

Loss masks. Fine-tuning a chat model trains only on what the assistant says, *including the token that ends
its turn* (<|im_end|>, <|eot_id|>, </s>, ...), or the model never learns to stop. Getting this wrong is a
classic silent bug (axolotl #1761 trained only on the last assistant turn; LMFlow #663). We find the
assistant spans exactly, for any template, without parsing it:

  1. render the conversation once with each message's content replaced by a unique placeholder; the text
     between placeholders is what the template adds (headers, separators, end-of-turn markers). Every
     message must appear: a template that drops one is refused;
  2. put the real contents back (allowing for templates that `strip`/`trim` them or write them as JSON),
     checking the result is character-for-character the real rendering;
  3. an assistant span runs from the first character of its content to the end of the first end-of-turn
     marker (EOS or a known turn-closing token) the template writes after it, e.g. "4<|im_end|>"; the "\\n"
     after <|im_end|> and the next turn's header are prompt, not target;
  4. an assistant tool call has no content to stand in for (the template writes it from the structured
     call), so its span is found by rendering the conversation up to it with the generation prompt and up
     to and including it: the call is what lies between, up to its end-of-turn marker. Tool results are
     prompt, never target. A template that rewrites assistant contents (Qwen3 takes the <think> reasoning
     out of each reply and keeps it only after the last user turn) fails step 2; then every assistant span
     is found that way: what the template writes after the conversation so far plus the generation prompt,
     up to the end-of-turn marker -- what the model generates at that point, reasoning included;
  5. tokenize the whole string once with character offsets and give a label to every token that overlaps
     an assistant span (as transformers does for `{% generation %}` masks). Labels are aligned with
     input_ids (Hugging Face convention: the loss shifts them by one).
"""
from __future__ import annotations

import bisect
import functools
import json
import os
import re
import signal
import threading
from contextlib import contextmanager
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
# message, the system prompt is prepended to the first user message, as LLaMA-Factory does).

_ALTERNATE = ("{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}")

_SYSTEM_INTO_FIRST_USER = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = none %}{% endif %}")


def _qwen_tools(default_system: str | None) -> str:
    """Qwen2.5-Instruct's template (Qwen/Qwen2.5-7B-Instruct): ChatML, the system turn first (default_system
    when the conversation has none; no system turn when default_system is None), and tools as Qwen2.5 writes
    them. Without tools it writes exactly what Qwen2's (and, for default_system=None, plain ChatML) does."""
    if default_system is None:
        head_tools = "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
        head_plain = ("{%- if messages[0]['role'] == 'system' %}"
                      "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}")
    else:
        head_tools = ("{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
                      "{%- else %}{{- '" + default_system + "' }}{%- endif %}{{- '\\n\\n' }}")
        head_plain = ("{%- if messages[0]['role'] == 'system' %}"
                      "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
                      "{%- else %}{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{%- endif %}")
    return (
        "{%- if tools %}{{- '<|im_start|>system\\n' }}" + head_tools +
        "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
        "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
        "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
        "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
        "{%- else %}" + head_plain + "{%- endif %}"
        "{%- for message in messages %}"
        "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
        "(message.role == 'assistant' and not message.tool_calls) %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
        "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
        "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
        "{%- for tool_call in message.tool_calls %}"
        "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
        "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
        "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- elif message.role == 'tool' %}"
        "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}"
        "{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
        "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


# Llama 3.1 Instruct's template (meta-llama/Llama-3.1-8B-Instruct) for conversations with tools, custom
# tools in the first user message (its default), without the built-in tool branches nanolisa never uses.
_LLAMA31_TOOLS = (
    "{{- bos_token }}{%- set date_string = '26 Jul 2024' %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- if tools %}"
    "{%- if messages | length != 0 %}{%- set first_user_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}"
    "{{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}"
    "{{- 'Given the following functions, please respond with a JSON for a function call ' }}"
    "{{- 'with its proper arguments that best answers the given prompt.\\n\\n' }}"
    "{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}.' }}"
    "{{- 'Do not use variables.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user_message + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}"
    "{%- if not message.tool_calls | length == 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}' }}{{- '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}"
    "{%- else %}{{- message.content }}{%- endif %}{{- '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

# Llama 3 Instruct (meta-llama/Meta-Llama-3-8B-Instruct), as LMFlow's llama3.
_LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

_HAS_TOOL_MESSAGES = ("{%- set ns = namespace(tools=false) %}{%- for m in messages %}"
                      "{%- if m.role == 'tool' or m.tool_calls %}{%- set ns.tools = true %}{%- endif %}{%- endfor %}")

# LMFlow's `empty`: BOS before each user turn, the reply and EOS after it; no system prompt, no tools.
_EMPTY = (
    "{% if bos_token is not defined or eos_token is not defined %}"
    "{{ raise_exception('template empty writes BOS and EOS, but the tokenizer lacks one; use "
    "empty_no_special_tokens') }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('template empty (= disable) has no place for a ' + message['role'] + ' message (as "
    "LMFlow\\'s); put a system prompt into the first user message') }}{% endif %}{% endfor %}")

_EMPTY_NO_SPECIAL_TOKENS = (
    "{% for message in messages %}{% if message['role'] in ('user', 'assistant') %}{{ message['content'] }}"
    "{% else %}{{ raise_exception('template empty_no_special_tokens has no place for a ' + message['role'] + "
    "' message (as LMFlow\\'s); put a system prompt into the first user message') }}{% endif %}{% endfor %}")

PRESETS: dict[str, str] = {
    # ChatML: no default system prompt; tools as Qwen2.5 writes them.
    "chatml": _qwen_tools(None),
    # Qwen1.5 / Qwen2 instruct: ChatML with Qwen's default system prompt; tools as Qwen2.5 writes them.
    "qwen2": _qwen_tools("You are a helpful assistant."),
    # Qwen2.5 instruct (as LMFlow's qwen2_5).
    "qwen2_5": _qwen_tools("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
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
    # Llama 3 instruct; a conversation with tools is written as Llama 3.1's template writes it.
    "llama3": _HAS_TOOL_MESSAGES + "{%- if tools or ns.tools %}" + _LLAMA31_TOOLS + "{%- else %}" + _LLAMA3 +
              "{%- endif %}",
    # Phi-3 (microsoft/Phi-3-mini-4k-instruct).
    "phi3": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"),
    # Gemma instruct (google/gemma-7b-it): the assistant is called "model"; the system prompt goes into the
    # first user turn, as Gemma 3's own template does (Gemma 1 and 2's refuse a system message).
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
    # DeepSeek LLM chat (deepseek-ai/deepseek-llm-7b-chat, DeepSeek-V2-Chat).
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
    "empty": _EMPTY,
    "empty_no_special_tokens": _EMPTY_NO_SPECIAL_TOKENS,
}
# LMFlow's other names for the same templates.
PRESETS["yi"] = PRESETS["chatml"]          # Yi-34B-Chat: plain ChatML
PRESETS["deepseek_v2"] = PRESETS["deepseek"]
PRESETS["disable"] = PRESETS["empty"]

# Presets with a tool-call format (the others refuse conversations with tools).
TOOL_PRESETS = ("chatml", "yi", "qwen2", "qwen2_5", "llama3")

# End-of-turn strings a preset writes after assistant content (besides the tokenizer's EOS).
PRESET_END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "yi": "<|im_end|>", "qwen2": "<|im_end|>",
                      "qwen2_5": "<|im_end|>", "phi3": "<|end|>", "gemma": "<end_of_turn>", "yi1_5": "<|im_end|>",
                      "internlm2": "<|im_end|>"}



def unknown_markers_note(tokenizer, template: str | None) -> str | None:
    """A one-line note when a preset whose turns end with a special token (PRESET_END_OF_TURN: llama3's
    <|eot_id|>, ChatML's <|im_end|>, ...) writes markers the tokenizer has no token for: they are then
    encoded, and trained on, as plain text, and a reply does not stop at the end of its turn. None if fine."""
    if template not in PRESET_END_OF_TURN:
        return None
    marks = dict.fromkeys(re.findall(r"<\|[A-Za-z0-9_]+\|>|<(?:start|end)_of_turn>", PRESETS[template]))
    missing = [m for m in marks if tokenizer.token_to_id(m) is None]
    if not missing:
        return None
    return (f"the {template} template writes {', '.join(missing)}, which this tokenizer has no tokens for: "
            f"they are encoded as plain text, several tokens each (use a tokenizer of the {template} family, "
            f"or a template this tokenizer knows)")


# LMFlow template names nanolisa does not have, with what to use instead.
_LMFLOW_ALTERNATIVES = {"qwen2_for_tool": "qwen2", "llama3_for_tool": "llama3"}


# ---- the sandboxed, bounded Jinja environment (as transformers' _compile_jinja_template) ---------------
MAX_REPEAT = 1 << 20        # longest string/list `*` may build, largest size a call or filter may take
RENDER_SECONDS = 10.0       # time one rendering may take
_OUTPUT_SLACK = 8 << 20     # output allowance of one rendering beyond 4x its input


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


def _too_big(what: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(f"{what} exceeds nanolisa's limit of {MAX_REPEAT} for chat templates")


def _check_sizes(args, name: str) -> None:
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_REPEAT:
            raise _too_big(f"the size {a} given to {name}")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with the operators and calls that can make huge objects from tiny templates bounded."""
    intercepted_binops = frozenset(["*", "**", "%"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise _too_big(f"repeating a {type(seq).__name__} {n} times")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 4096:
            raise _too_big(f"the exponent {right}")
        elif operator == "%" and isinstance(left, str):
            if re.search(r"%[-#0 +]*\d{7,}", left):
                raise _too_big("a width in a %-format")
            if "*" in left:  # widths taken from the arguments
                _check_sizes(right if isinstance(right, tuple) else (right,), "a %-format")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _check_sizes(list(args) + list(kwargs.values()), getattr(__obj, "__name__", "a call"))
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_filter(name: str, f):
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # the value filtered (after any context): data

    @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
    def wrapper(*args, **kwargs):
        _check_sizes(list(args[skip:]) + list(kwargs.values()), f"the filter {name}")
        return f(*args, **kwargs)
    return wrapper


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        with _time_limit(RENDER_SECONDS):
            return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template does not parse: {_one_line(e.message)} (line {e.lineno})") from None
    except _Timeout:
        raise UserError(f"chat template took more than {RENDER_SECONDS:g} s to compile") from None
    except (MemoryError, RecursionError) as e:
        raise UserError(f"chat template does not compile: {type(e).__name__}") from None


class _Timeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that no `except Exception` in between swallows it."""


@contextmanager
def _time_limit(seconds: float):
    """Raise _Timeout in this (main) thread after `seconds`. Elsewhere, or when a timer is already set by
    someone else, there is no limit."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return

    def on_alarm(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


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
        try:
            with open(template, encoding="utf-8") as f:
                return os.path.basename(template), f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{template}: cannot read the chat template ({_one_line(e)})") from None
    hint = ""
    if template in _LMFLOW_ALTERNATIVES:
        hint = (f" (LMFlow's {template} writes tool calls its own way; {_LMFLOW_ALTERNATIVES[template]} writes "
                "them as the model's own template does)")
    raise UserError(f"unknown chat template {template!r}{hint}: use one of {', '.join(PRESETS)}, "
                    "a Jinja string, or the path of a .jinja file")


def _special_tokens(tokenizer) -> dict[str, str]:
    """What transformers passes to the template as variables: its named special tokens that are set."""
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            out[name] = value
    return out


def _input_size(messages: list[dict], tools) -> int:
    n = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    extra = [m["tool_calls"] for m in messages if m.get("tool_calls")] + ([tools] if tools else [])
    return n + (len(json.dumps(extra, ensure_ascii=False)) if extra else 0)


def _render(source: str, messages: list[dict], tokenizer, add_generation_prompt: bool, tools=None) -> str:
    """Render in the sandbox, bounded in time and output size; any failure is one line (UserError)."""
    limit = _OUTPUT_SLACK + 4 * _input_size(messages, tools)
    try:
        with _time_limit(RENDER_SECONDS):
            pieces, n = [], 0
            for piece in compile_template(source).generate(messages=messages, tools=tools, documents=None,
                                                            add_generation_prompt=add_generation_prompt,
                                                            **_special_tokens(tokenizer)):
                n += len(piece)
                if n > limit:
                    raise UserError(f"chat template wrote more than {limit} characters for one conversation "
                                    f"(4x its input plus {_OUTPUT_SLACK}); a hostile or broken template?")
                pieces.append(piece)
            return "".join(pieces)
    except _Timeout:
        raise UserError(f"chat template took more than {RENDER_SECONDS:g} s to render one conversation; "
                        "a hostile or broken template?") from None
    except jinja2.TemplateError as e:
        raise UserError(f"chat template error: {_one_line(e)}") from None
    except (MemoryError, RecursionError) as e:
        raise UserError(f"chat template failed: {type(e).__name__} while rendering one conversation; "
                        "a hostile or broken template?") from None
    except (TypeError, ValueError, AttributeError, LookupError, ArithmeticError) as e:
        raise UserError(f"chat template error: {type(e).__name__}: {_one_line(e)}") from None


def render_chat(messages: list[dict], tokenizer, template: str | None = None, add_generation_prompt: bool = False,
                tools: list | None = None) -> str:
    """The conversation as the template writes it (same string as transformers' apply_chat_template
    with tokenize=False)."""
    _, source = resolve_template(tokenizer, template)
    return _render(source, messages, tokenizer, add_generation_prompt, tools)


# ---- assistant spans and labels ----------------------------------------------------------------------
MESSAGE_MARK = re.compile("\ue000(\\d+)\ue001")  # placeholder for message i: private-use characters around i


def _end_markers(tokenizer, name: str) -> list[str]:
    markers = [m for m in (getattr(tokenizer, "eos_token", None), PRESET_END_OF_TURN.get(name)) if m]
    return markers + [t for t in END_OF_TURN_TOKENS if t not in markers]


def _first_marker(s: str, markers: list[str]) -> int:
    """End (exclusive) of the first end-of-turn marker in s, or -1."""
    found = [(s.find(m), m) for m in markers if s.find(m) >= 0]
    if not found:
        return -1
    at, m = min(found, key=lambda x: (x[0], -len(x[1])))
    return at + len(m)


def uses_tools(messages: list[dict], tools) -> bool:
    """Whether a conversation has tool definitions, tool calls or tool results."""
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def _tool_call_span(source: str, messages: list[dict], k: int, text: str, tokenizer, tools, name: str,
                    markers: list[str]) -> tuple[int, int]:
    """The span of assistant message k, a tool call: what the template writes between the conversation up
    to k (with the generation prompt) and the conversation up to and including k, up to its end marker."""
    before = _render(source, messages[:k], tokenizer, True, tools)
    if not text.startswith(before):
        before = _render(source, messages[:k], tokenizer, False, tools)
    upto = _render(source, messages[:k + 1], tokenizer, False, tools)
    if not (text.startswith(before) and text.startswith(upto) and len(upto) > len(before)):
        raise UserError(f"chat template {name!r} writes the conversation differently when it ends at message {k} "
                        "(a tool call), so nanolisa cannot find the call to train on; use a preset with --template")
    start, target = len(before), text[len(before):len(upto)]
    at = _first_marker(target, markers)
    end = start + (at if at >= 0 else len(target))
    written = text[start:end]
    for call in messages[k]["tool_calls"]:
        fn = call.get("function", call)
        if str(fn.get("name")) not in written:
            raise UserError(f"chat template {name!r} does not write the tool call {fn.get('name')!r} of message "
                            f"{k}; use a template with a tool-call format (--template {'/'.join(TOOL_PRESETS)})")
    content = messages[k].get("content")
    if isinstance(content, str) and content.strip() and content.strip() not in written:
        raise UserError(f"chat template {name!r} leaves out the text of message {k}, which comes with a tool call; "
                        "nanolisa will not train without it")
    return start, end


def assistant_spans(messages: list[dict], tokenizer, template: str | None = None, tools: list | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character span of each assistant reply or tool call + its end-of-turn
    marker])."""
    name, source = resolve_template(tokenizer, template)
    tooly = uses_tools(messages, tools)
    if tooly and name in PRESETS and name not in TOOL_PRESETS:
        raise UserError(f"template {name!r} has no format for tool calls; use one of {', '.join(TOOL_PRESETS)} "
                        "or the model's own template")
    try:
        text = _render(source, messages, tokenizer, False, tools)
    except UserError as e:
        raise UserError(f"{e} (the conversation has tool calls: does template {name!r} support them? "
                        f"--template {'/'.join(TOOL_PRESETS)} do)" if tooly and name not in PRESETS else e) from None
    if tools and _render(source, messages, tokenizer, False, None) == text:
        raise UserError(f"chat template {name!r} ignores the tool definitions ('tools'); use a template that "
                        f"writes them (--template {'/'.join(TOOL_PRESETS)})")
    # every message's content becomes a placeholder, except tool calls (the template writes those itself)
    holders = {i for i, m in enumerate(messages) if isinstance(m.get("content"), str) and not m.get("tool_calls")}
    masked = [dict(m, content=f"\ue000{i}\ue001") if i in holders else m for i, m in enumerate(messages)]
    skeleton = _render(source, masked, tokenizer, False, tools)
    parts = MESSAGE_MARK.split(skeleton)  # [seg0, idx0, seg1, idx1, seg2, ...]: template text between contents
    missing = sorted(holders - {int(parts[k]) for k in range(1, len(parts), 2)})
    if missing:
        i = missing[0]
        raise UserError(f"chat template {name!r} leaves out message {i} ({messages[i]['role']}); nanolisa will not "
                        "train with part of the conversation silently missing")
    markers = _end_markers(tokenizer, name)
    spans, pos = [], len(parts[0])
    if not text.startswith(parts[0]):
        raise UserError(f"chat template {name!r} renders message contents in a way nanolisa cannot align")
    for k in range(1, len(parts), 2):
        i, seg = int(parts[k]), parts[k + 1]
        content = messages[i]["content"]
        # the template may have trimmed the content, or written it as JSON: take the variant that
        # reproduces the real rendering
        for variant in (content, content.strip(), content.lstrip(), content.rstrip(),
                        json.dumps(content, ensure_ascii=False)[1:-1]):
            if text.startswith(variant + seg, pos):
                break
        else:  # the template rewrites this content (Qwen3 moves <think> reasoning out of it, or drops it)
            return text, _spans_after_prompts(source, messages, text, tokenizer, tools, name, markers, i)
        start, end = pos, pos + len(variant)
        if messages[i]["role"] == "assistant":
            # the reply's target ends after the first end-of-turn marker the template writes after it
            at = _first_marker(seg, markers)
            if at >= 0:
                end = end + at
            if end > start:
                spans.append((start, end))
        pos = pos + len(variant) + len(seg)
    if pos != len(text):
        raise UserError(f"chat template {name!r} renders message contents in a way nanolisa cannot align")
    for k, m in enumerate(messages):
        if m.get("role") == "assistant" and m.get("tool_calls"):
            spans.append(_tool_call_span(source, messages, k, text, tokenizer, tools, name, markers))
    return text, sorted(spans)


def _spans_after_prompts(source: str, messages: list[dict], text: str, tokenizer, tools, name: str,
                         markers: list[str], rewritten: int) -> list[tuple[int, int]]:
    """Assistant spans for a template that rewrites message contents (step 2 failed for message `rewritten`):
    an assistant turn is what the template writes after its generation prompt -- the conversation up to it,
    rendered with add_generation_prompt -- up to its end-of-turn marker, which is exactly what the model is
    asked to generate. For Qwen3 that is "<think>...</think>\n\nanswer<|im_end|>" in the turns that keep
    their reasoning and "answer<|im_end|>" in the earlier ones, whose reasoning its template drops."""
    for i, m in enumerate(messages):  # nothing but assistant text may be rewritten or left out
        content = m.get("content")
        if m.get("role") != "assistant" and isinstance(content, str) and content.strip() not in text:
            raise UserError(f"chat template {name!r} rewrites message {i}'s content; nanolisa cannot align "
                            "the conversation to find the assistant text (use a preset with --template)")
    spans = []
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        if m.get("tool_calls"):
            spans.append(_tool_call_span(source, messages, k, text, tokenizer, tools, name, markers))
            continue
        before = _render(source, messages[:k], tokenizer, True, tools)
        if not text.startswith(before):
            raise UserError(f"chat template {name!r} rewrites message {rewritten}'s content and writes the "
                            f"conversation differently when it ends at message {k}; nanolisa cannot find the "
                            "assistant text to train on (use a preset with --template)")
        at = _first_marker(text[len(before):], markers)
        end = len(text) if at < 0 else len(before) + at
        if end > len(before):
            spans.append((len(before), end))
    return sorted(spans)


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
    """(input_ids, labels) for one conversation. labels = input_ids on assistant replies and tool calls (with
    their end-of-turn token), IGNORE_INDEX on everything else (system, user, tool results); with
    train_on_prompt, labels = input_ids everywhere. The rendered string is encoded without adding special
    tokens, as apply_chat_template does: templates that want a BOS write `bos_token` themselves."""
    text, spans = assistant_spans(messages, tokenizer, template, tools)
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
    if train_on_prompt:
        return list(ids), list(ids)
    return list(ids), labels_from_spans(ids, offsets, spans)
