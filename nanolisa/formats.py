"""Dataset formats: read the files people already have (LMFlow's, LLaMA-Factory's, OpenAI-style) into
nanolisa's three instance types, or refuse them in one line.

The three instance types (LMFlow's):

  text_only     {"text"}
  text2text     {"input", "output"}
  conversation  {"system"?, "tools"?, "messages": [...]}: the messages written as transformers'
                apply_chat_template takes them (templates.py): roles user / assistant / tool, an assistant
                tool call as {"role": "assistant", "content": None or text, "tool_calls": [{"type":
                "function", "function": {"name", "arguments": {...}}}]}, `tools` a list of JSON schemas
                {"type": "function", "function": {"name", "description", "parameters"}}.

What is read (records are JSON objects in a .json list, a .jsonl file, or LMFlow's {"type", "instances"}):

  * LMFlow typed files: text_only, text2text, conversation; a conversation's `tools` is a list of tool
    descriptions (JSON strings or objects), its messages may hold LMFlow's tool roles `function` (the
    assistant's call: JSON {"name", "arguments"}) and `observation` (the tool's result).
  * Alpaca (instruction, input?, output, system?, history?, tools?): user = instruction + "\\n" + input (as
    LLaMA-Factory joins them), assistant = output; `history` ([[instruction, response], ...]) becomes the
    earlier rounds, trained like the last (LLaMA-Factory trains them).
  * ShareGPT (conversations: [{"from", "value"}], system?, tools?): from human / gpt / system and
    LLaMA-Factory's function_call (the call, JSON) and observation (the result); `tools` a JSON string.
  * OpenAI-style (messages: [{"role", "content"}], tools?): roles system / user / assistant (with
    `tool_calls`, arguments a JSON string or object) / tool, and LLaMA-Factory's function_call and
    observation; content a string or a list of text parts ([{"type": "text", "text" or "value"}], as
    OpenAI and LLaMA-Factory's v1 data write it), `loss_weight` (v1) where it agrees with what nanolisa
    trains (1 on assistant messages, 0 elsewhere).
  * {"text"} records (text_only) and {"input", "output"} records (text2text).

Refused in one line naming the file, the record and the field (nanolisa trains text, supervised):
media (`images`, `videos`, `audios`, non-text content parts), preference data (`chosen` / `rejected`, LMFlow's
paired types), KTO data (a boolean `label` or `kto_tag`). Fields nanolisa does not use are never dropped
silently: reading a file returns a note naming them, with how many records hold each.

How the code reads: `read_file` picks the file's layout (.txt, .jsonl, a .json list, LMFlow's typed object);
`record` tells the record formats apart by the field each is recognized by and hands the record to that
format's own function (`sharegpt`, `messages`, `alpaca`; `lmflow` for LMFlow's typed files), each of which
turns its record into a list of turns; `conversation` checks the turn order they all share and builds the
instance. `Unused` counts the fields nothing used, for the note.
"""
from __future__ import annotations

import json
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable

from nanolisa.errors import UserError
from nanolisa.runtime import available_memory, gigabytes

TYPES = ("text_only", "text2text", "conversation")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system", "function_call": "call", "observation": "tool", "tool": "tool"}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                "function_call": "call", "observation": "tool"}
LMFLOW_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "function": "call",
                "observation": "tool", "tool": "tool"}
MEDIA_FIELDS = ("images", "videos", "audios")
PREFERENCE_FIELDS = ("chosen", "rejected", "chosen_messages", "rejected_messages")
NOT_SFT_TYPES = {"paired_conversation": "preference data (chosen/rejected conversations)",
                 "paired_text_to_text": "preference data (prompt, chosen, rejected)",
                 "text_to_scored_textlist": "scored outputs for reward modelling",
                 "text_to_textlist": "several outputs per input, for inference",
                 "float_only": "numbers, not text",
                 "image_text": "images with text (media)"}
# Known fields of each record shape, beside those it is recognized by.
KNOWN = {"text_only": {"text"}, "text2text": {"input", "output"},
         "alpaca": {"instruction", "input", "output", "system", "history", "tools"},
         "sharegpt": {"conversations", "system", "tools"},
         "messages": {"messages", "system", "tools", "conversation_id"}}
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class Unused:
    """The fields of one file's records that nanolisa does not use, counted for one note: a field counts
    once per record that holds it (a message field once, however many messages of the record hold it)."""

    def __init__(self, path: str):
        self.path = path
        self.counts: Counter[str] = Counter()   # field -> number of records holding it
        self.record: set[str] = set()           # the fields of the record being read

    def fields(self, rec: dict, known: set[str], prefix: str = "") -> None:
        self.record.update(f"{prefix}{k}" for k in rec if k not in known)

    def next_record(self) -> None:
        self.counts.update(self.record)
        self.record = set()

    def note(self, n_records: int) -> str | None:
        """One line naming the fields nanolisa did not use, or None."""
        if not self.counts:
            return None
        fields = ", ".join(f"{k} ({v} of {n_records} records)" for k, v in sorted(self.counts.items()))
        return f"{self.path}: fields nanolisa does not use, ignored: {fields}"


# ---- a file of records --------------------------------------------------------------------------------
def read_records(records: Iterable[tuple[str, object]], path: str, unused: Unused,
                 check_surrogates: bool) -> tuple[str, list[dict]]:
    """(type, instances) of one file's records, [(label, raw record)], all of one type; the label names
    the record in an error ("line 3", "record 2")."""
    typ, out = None, []
    for label, rec in records:
        where = f"{path}: {label}"
        if check_surrogates:
            _check_surrogates(rec, where)
        t, inst = record(rec, where, unused)
        if typ is not None and t != typ:
            raise UserError(f"{where}: record is {t} but earlier records are {typ}; use one format per file")
        typ = t
        out.append(inst)
        unused.next_record()
    return typ or "text_only", out


# ---- one record, of any format ---------------------------------------------------------------------------
def record(rec, where: str, unused: Unused) -> tuple[str, dict]:
    """One Alpaca / ShareGPT / OpenAI / {text} / {input, output} record -> (type, normalized instance).
    The format is told by the field a record is recognized by."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    refuse_non_sft(rec, where)
    if "conversations" in rec:
        unused.fields(rec, KNOWN["sharegpt"])
        return "conversation", sharegpt(rec, where, unused)
    if "messages" in rec:  # OpenAI-style (and LMFlow conversation instances)
        unused.fields(rec, KNOWN["messages"])
        return "conversation", messages(rec, where, OPENAI_ROLES, unused)
    if "instruction" in rec:
        unused.fields(rec, KNOWN["alpaca"])
        return "conversation", alpaca(rec, where)
    if "input" in rec or "output" in rec:
        unused.fields(rec, KNOWN["text2text"])
        return "text2text", {"input": string(rec, "input", where), "output": string(rec, "output", where)}
    if "text" in rec:
        unused.fields(rec, KNOWN["text_only"])
        return "text_only", {"text": string(rec, "text", where)}
    raise UserError(f"{where}: unrecognized record with keys {sorted(rec)[:6]}; expected Alpaca "
                    "(instruction/output), ShareGPT (conversations), OpenAI (messages), {text} or {input, output}")


def refuse_non_sft(rec: dict, where: str) -> None:
    """Media, preference and KTO records: say what they are, in one line."""
    for k in MEDIA_FIELDS:
        if rec.get(k) not in (None, [], ""):
            raise UserError(f"{where}: field {k!r} holds media; nanolisa trains on text only and will not "
                            f"train this record without its {k[:-1]}s (remove the field and any <{k[:-1]}> "
                            "placeholders, or use a multimodal trainer)")
    for k in PREFERENCE_FIELDS:
        if k in rec:
            raise UserError(f"{where}: field {k!r}: this is preference data (DPO / reward modelling); "
                            "nanolisa trains supervised fine-tuning only (to train on the preferred replies, "
                            "write them as the assistant's replies)")
    for k in ("kto_tag", "label"):
        if isinstance(rec.get(k), bool):
            raise UserError(f"{where}: field {k!r} = {str(rec[k]).lower()}: this is KTO data (a label marks "
                            "good and bad replies); nanolisa trains supervised fine-tuning only and would "
                            "train the bad replies too (keep the records labelled true, without the field)")


# ---- ShareGPT ----------------------------------------------------------------------------------------------
def sharegpt(rec: dict, where: str, unused: Unused) -> dict:
    """{"conversations": [{"from", "value"}], "system"?, "tools"?} -> a conversation instance."""
    conv = rec["conversations"]
    if not isinstance(conv, list):
        raise UserError(f"{where}: field 'conversations' must be a list")
    items = []
    for j, m in enumerate(conv):
        at = f"{where}: conversations[{j}]"
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise UserError(f"{at} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m["from"], str) else None
        if role is None:
            raise UserError(f"{at}: unknown role {m['from']!r} (expected human, gpt, system, "
                            "function_call or observation)")
        unused.fields(m, {"from", "value"}, "conversations[].")
        items.append((role, content(m["value"], f"{at}.value"), {}, at, m["from"]))
    return conversation(items, rec, where)


# ---- OpenAI-style messages (and LMFlow's conversation instances) -----------------------------------------
def messages(rec: dict, where: str, roles: dict[str, str], unused: Unused) -> dict:
    """{"messages": [{"role", "content", "tool_calls"?}], "system"?, "tools"?} -> a conversation instance;
    roles maps the file's role names to nanolisa's (OPENAI_ROLES or LMFLOW_ROLES)."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list):
        raise UserError(f"{where}: field 'messages' must be a list of {{role, content}}")
    items = []
    for j, m in enumerate(msgs):
        at = f"{where}: messages[{j}]"
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise UserError(f"{at} must be an object with 'role' and 'content'")
        role = roles.get(m["role"]) if isinstance(m["role"], str) else None
        if role is None:
            ambiguous = " (LMFlow's tool call, or OpenAI's old function result? use role 'tool' for a " \
                        "result, tool_calls for a call)" if m["role"] == "function" else ""
            raise UserError(f"{at}: unknown role {m['role']!r}{ambiguous} (expected {', '.join(sorted(roles))})")
        extra = {}
        if m.get("tool_calls"):
            if role != "assistant":
                raise UserError(f"{at}: 'tool_calls' on a {m['role']!r} message (only the assistant calls tools)")
            extra["tool_calls"] = tool_calls(m["tool_calls"], f"{at}: 'tool_calls'")
        if role == "tool":
            extra.update({k: m[k] for k in ("name", "tool_call_id") if isinstance(m.get(k), str)})
        check_loss_weight(m, role, at)
        known = {"role", "content", "tool_calls", "loss_weight"} | ({"name", "tool_call_id"} if role == "tool" else set())
        unused.fields(m, known, "messages[].")
        text = m.get("content")
        if text is None and extra.get("tool_calls"):
            items.append((role, None, extra, at, m["role"]))
        else:
            items.append((role, content(text, f"{at}.content"), extra, at, m["role"]))
    return conversation(items, rec, where)


def check_loss_weight(m: dict, role: str, where: str) -> None:
    """LLaMA-Factory v1's `loss_weight` is accepted where it says what nanolisa trains anyway."""
    weight = m.get("loss_weight")
    if weight is not None and weight != (1 if role in ("assistant", "call") else 0):
        raise UserError(f"{where}: 'loss_weight' {weight} on the {m['role']} message: nanolisa trains every "
                        "assistant message (weight 1) and nothing else (weight 0); other weights are "
                        "not supported")


# ---- Alpaca ------------------------------------------------------------------------------------------------
def alpaca(rec: dict, where: str) -> dict:
    """{"instruction", "input"?, "output", "system"?, "history"?, "tools"?} -> a conversation instance,
    the `history` rounds first."""
    instruction = string(rec, "instruction", where)
    query = string(rec, "input", where, optional=True)
    output = string(rec, "output", where)
    items = []
    history = rec.get("history")
    if history not in (None, []):
        if not isinstance(history, list):
            raise UserError(f"{where}: field 'history' must be a list of [instruction, response] pairs")
        for j, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise UserError(f"{where}: history[{j}] must be a pair [instruction, response] of strings")
            items += [("user", pair[0], {}, f"{where}: history[{j}]", "user"),
                      ("assistant", pair[1], {}, f"{where}: history[{j}]", "assistant")]
    user = "\n".join(x for x in (instruction, query) if x)  # LLaMA-Factory: "instruction\ninput"
    items += [("user", user, {}, where, "user"), ("assistant", output, {}, where, "assistant")]
    return conversation(items, rec, where)


# ---- LMFlow's typed files: {"type", "instances"} ---------------------------------------------------------
def lmflow(data: dict, path: str, unused: Unused, check_surrogates: bool) -> tuple[str, list[dict]]:
    """(type, instances) of one LMFlow file; its type says what every instance is."""
    if "type" not in data:
        raise UserError(f"{path}: missing \"type\" (one of {', '.join(TYPES)})")
    typ = data["type"]
    if typ in NOT_SFT_TYPES:
        raise UserError(f"{path}: type {typ!r} is {NOT_SFT_TYPES[typ]}; nanolisa trains supervised fine-tuning "
                        f"on text ({', '.join(TYPES)})")
    if typ not in TYPES:
        raise UserError(f"{path}: unknown type {typ!r} (expected one of {', '.join(TYPES)})")
    if "instances" not in data:
        raise UserError(f"{path}: missing \"instances\"")
    if not isinstance(data["instances"], list):
        raise UserError(f"{path}: \"instances\" must be a list")
    unused.fields(data, {"type", "instances"})
    unused.next_record()
    out = []
    for i, inst in enumerate(data["instances"]):
        where = f"{path}: instance {i}"
        if check_surrogates:
            _check_surrogates(inst, where)
        out.append(lmflow_instance(typ, inst, where, unused))
        unused.next_record()
    return typ, out


def lmflow_instance(typ: str, inst, where: str, unused: Unused) -> dict:
    """One instance of an LMFlow file of type typ."""
    if not isinstance(inst, dict):
        raise UserError(f"{where}: instance must be a JSON object, got {type(inst).__name__}")
    refuse_non_sft(inst, where)
    if typ == "text_only":
        unused.fields(inst, KNOWN["text_only"])
        return {"text": string(inst, "text", where)}
    if typ == "text2text":
        unused.fields(inst, KNOWN["text2text"])
        return {"input": string(inst, "input", where), "output": string(inst, "output", where)}
    unused.fields(inst, KNOWN["messages"])
    return messages(inst, where, LMFLOW_ROLES, unused)


# ---- what every conversation format shares ---------------------------------------------------------------
def conversation(items: list[tuple], rec: dict, where: str) -> dict:
    """items: (role, content, extra, where, the role as written) with role user / assistant / system /
    call / tool ->
    {"system"?, "tools"?, "messages"}, checking the order: user, then assistant; a tool call is
    answered by one or more tool results, then the assistant goes on; the last message is the
    assistant's."""
    system = string(rec, "system", where, optional=True)
    if system == "":
        system = None
    if items and items[0][0] == "system":
        if system is not None:
            raise UserError(f"{where}: both a 'system' field and a leading system message; keep one")
        system = items[0][1]
        items = items[1:]
    out: list[dict] = []
    written = []  # the roles as the file spells them, for messages
    for role, text, extra, at, spelled in items:
        if role == "call":  # LMFlow's function / LLaMA-Factory's function_call: the call is the content
            role, extra, text = "assistant", {"tool_calls": tool_calls(text, f"{at}")}, None
        prev = out[-1] if out else None
        if prev is None:
            want = ("user",)
        elif prev["role"] == "user":
            want = ("assistant",)
        elif prev["role"] == "assistant":
            want = ("tool",) if prev.get("tool_calls") else ("user",)
        else:  # tool
            want = ("tool", "assistant")
        if role not in want:
            if role == "system":
                raise UserError(f"{at}: a system message can only come first")
            expected = " or ".join(repr(w) for w in want)
            raise UserError(f"{at}: role {spelled!r} ({role}) where {expected} was expected (conversations "
                            "go user, assistant, ...; a tool call is followed by its results)")
        out.append({"role": role, "content": text, **extra})
        written.append(spelled)
    if not out:
        raise UserError(f"{where}: conversation has no messages")
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: conversation ends with role {written[-1]!r}; the last message must "
                        "be the assistant's reply (nanolisa trains supervised fine-tuning)")
    res: dict = {"messages": out}
    if system is not None:
        res["system"] = system
    defined = tools(rec.get("tools"), where)
    if defined:
        res["tools"] = defined
    return res


def content(value, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined as LLaMA-Factory's v1 does)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for k, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise UserError(f"{where}[{k}]: content part of type {kind!r} is not supported: nanolisa "
                                "trains on parts of type 'text' only (media cannot be trained as text)")
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise UserError(f"{where}[{k}]: a text part needs a string 'text' (or 'value')")
            texts.append(text)
        return "".join(texts)
    raise UserError(f"{where} must be a string or a list of text parts, got {type(value).__name__}")


def tools(value, where: str) -> list[dict] | None:
    """Tool definitions: a JSON string (LLaMA-Factory), a list of JSON strings (LMFlow) or of objects
    (OpenAI) -> a list of {"type": "function", "function": {...}} schemas (bare ones are wrapped, as
    LLaMA-Factory does), or None."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        value = _json_value(value, f"{where}: field 'tools'", what="a JSON list of tool descriptions")
        if value in (None, [], {}):
            return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise UserError(f"{where}: field 'tools' must be a list of tool descriptions (or a JSON string of one)")
    out = []
    for j, tool in enumerate(value):
        if isinstance(tool, str):
            tool = _json_value(tool, f"{where}: tools[{j}]")
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict) \
                and isinstance(tool["function"].get("name"), str):
            out.append(tool)
        elif isinstance(tool, dict) and isinstance(tool.get("name"), str):
            out.append({"type": "function", "function": tool})
        else:
            raise UserError(f"{where}: tools[{j}] must describe a function: a JSON object with a 'name' "
                            "(or {\"type\": \"function\", \"function\": {\"name\", ...}})")
    return out


def tool_calls(value, where: str) -> list[dict]:
    """A call as LLaMA-Factory / LMFlow write it ({"name", "arguments"} or a list of them, JSON) or as
    OpenAI does ([{"type": "function", "function": {"name", "arguments": JSON string}}]) -> HF's form,
    arguments an object."""
    if isinstance(value, str):
        value = _json_value(value, where, what="a tool call: JSON {\"name\": ..., \"arguments\": {...}}")
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise UserError(f"{where}: no tool call")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]" if isinstance(value, list) else where
        fn = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
            raise UserError(f"{at}: a tool call must be a JSON object with 'name' and 'arguments'")
        args = fn["arguments"]
        if isinstance(args, str):
            args = _json_value(args, f"{at}: 'arguments'", what="a JSON object")
        if not isinstance(args, dict):
            raise UserError(f"{at}: 'arguments' must be a JSON object, got {type(args).__name__}")
        hf = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            hf["id"] = call["id"]
        out.append(hf)
    return out


def string(rec: dict, key: str, where: str, optional: bool = False) -> str | None:
    """rec[key], which must be a string (optional: None when missing or null)."""
    if key not in rec or (optional and rec[key] is None):
        if optional:
            return None
        raise UserError(f"{where}: missing field {key!r}")
    if not isinstance(rec[key], str):
        raise UserError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def _json_value(s: str, where: str, what: str = "JSON"):
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at position {e.pos}); expected {what}") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None


def _check_surrogates(value, where: str, path: str = "") -> None:
    """A lone surrogate (JSON "\\ud800") is not text; find the field that holds one."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise UserError(f"{where}: field {path or 'value'!r} holds a lone surrogate "
                            f"({ascii(_SURROGATE.search(value).group())}), which is not valid Unicode text")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_surrogates(k, where, path)
            _check_surrogates(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for j, v in enumerate(value):
            _check_surrogates(v, where, f"{path}[{j}]")


# ---- files -----------------------------------------------------------------------------------------------
# Reading a data file holds about 3x its size in memory: 82 MB of text2text JSON records peaked 240 MB above
# the process before (the file's text, then its parsed records as Python objects).
READ_MEMORY = 3


def read_text(path: str) -> str:
    """A data file's text. Refused first (one line): anything but a regular file (a FIFO would block for
    ever, a device never ends), and a file that cannot fit in memory (a MemoryError, or worse, later)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: is a directory, not a data file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file (a pipe, a socket or a device); give a data file")
    need, have = READ_MEMORY * st.st_size, available_memory()
    if need > have:
        raise UserError(f"{path}: reading {gigabytes(st.st_size)} of data takes about {gigabytes(need)} of memory, "
                        f"more than the {gigabytes(have)} available; train on a smaller part of it, or on a machine "
                        f"with more memory")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is not data
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a data file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def parse_json(text: str, path: str, where: str | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}, column {e.colno}" if where is None else f"column {e.colno}"
        raise UserError(f"{path}: {where + ': ' if where else ''}malformed JSON ({e.msg} at {at})") from None
    except RecursionError:
        raise UserError(f"{path}: {where + ': ' if where else ''}JSON nested too deeply") from None


def read_file(path: str) -> tuple[str, list[dict], list[str]]:
    """(type, instances, notes) of one data file (.json, .jsonl or .txt)."""
    text = read_text(path)
    ext = os.path.splitext(path)[1].lower()
    unused, check = Unused(path), bool(_SURROGATE_ESCAPE.search(text))
    notes: list[str] = []
    if ext in (".csv", ".tsv", ".parquet", ".arrow"):
        raise UserError(f"{path}: {ext[1:]} files are not read; convert to .json or .jsonl records")
    if ext == ".txt":
        lines = text.replace("\r\n", "\n").split("\n")
        blocks = [b.strip("\n") for b in "\n".join(lines).split("\n\n")]
        instances = [{"text": b} for b in blocks if b.strip()]
        n_lines = sum(1 for line in lines if line.strip())
        notes.append(f"{path}: plain text, one document per blank-line-separated block: {len(instances)} "
                     f"document{'s' if len(instances) != 1 else ''} from {n_lines} non-empty lines; for one document "
                     "per line, give a .jsonl of {\"text\": ...} records instead")
        return "text_only", instances, notes
    if ext == ".jsonl":
        # JSON Lines are split at "\n" only: U+2028 / U+2029 inside a string are valid JSON, not line ends
        records = [(f"line {n}", parse_json(line, path, f"line {n}"))
                   for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
        typ, instances = read_records(records, path, unused, check)
    else:
        data = parse_json(text, path)
        if isinstance(data, dict) and ("type" in data or "instances" in data):
            typ, instances = lmflow(data, path, unused, check)
        elif isinstance(data, dict):
            typ, instances = read_records([("record 0", data)], path, unused, check)
        elif isinstance(data, list):
            typ, instances = read_records(((f"record {n}", r) for n, r in enumerate(data)), path, unused, check)
        else:
            raise UserError(f"{path}: expected a JSON object with \"type\" and \"instances\", or a list of records")
    note = unused.note(len(instances))
    return typ, instances, [note] if note else []


def read_lmflow_dir(path: str) -> tuple[str, list[dict], list[str], list[str]]:
    """(type, instances, notes, files read) of a directory of LMFlow *.json files, all of one type."""
    names = sorted(os.listdir(path))
    files = [os.path.join(path, f) for f in names if f.endswith(".json")]
    for f in files:
        if os.path.isdir(f):
            raise UserError(f"{f}: is a directory; a data directory holds LMFlow *.json files")
    if not files:
        raise UserError(f"{path}: directory has no *.json files")
    typ, instances, notes = None, [], []
    for f in files:
        text = read_text(f)
        data = parse_json(text, f)
        if not isinstance(data, dict):
            raise UserError(f"{f}: expected an LMFlow JSON object with \"type\" and \"instances\"")
        unused = Unused(f)
        t, inst = lmflow(data, f, unused, check_surrogates=bool(_SURROGATE_ESCAPE.search(text)))
        if typ is not None and t != typ:
            raise UserError(f"{f}: type {t!r} differs from {typ!r} of the other files in {path}; "
                            "a directory must hold one type")
        typ = t
        instances += inst
        if unused.note(len(inst)):
            notes.append(unused.note(len(inst)))
    others = [f for f in names if not f.endswith(".json") and not f.startswith(".")]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        notes.append(f"{path}: read the {len(files)} *.json file{'s' if len(files) != 1 else ''} (LMFlow's rule); "
                     f"not read: {shown}")
    return typ, instances, notes, files
