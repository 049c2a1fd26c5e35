"""The generic record formats (TRL's), the same in every stage; any file kind of `files`.

  preference           {"prompt", "chosen", "rejected"}: each a string or a list of {"role", "content"} messages
                       (TRL's standard and conversational forms). Without "prompt", chosen and rejected are whole
                       conversations and the prompt is their shared leading messages (TRL's implicit prompt).
  unpaired_preference  {"prompt", "completion", "label"}: label true/false or 1/0 (the BCE form).
  messages             {"messages": [...]}: a dialog (SFT); its assistant turns after a user turn are targets.
  prompt               {"prompt": string or messages}: an RL prompt.

A string prompt is one user message; a string response is the assistant's reply. Roles are system, user and
assistant. An optional "group" (a string or number) is the split key: records of one group land on one side of a
train / held-out split; without it the key is the first user message.
"""
from typing import Iterator

from perl_jax.data.files import FieldError, check_pair, get_field, nonempty, read_records

ROLES = ("system", "user", "assistant")


def messages_field(value, name: str) -> list[dict]:
  """A non-empty list of {"role": system|user|assistant, "content": str} messages (other keys dropped)."""
  if not isinstance(value, list) or not value:
    raise FieldError(name, "expected a string or a non-empty list of {role, content} messages")
  out = []
  for i, m in enumerate(value):
    where = f"{name}[{i}]"
    if not isinstance(m, dict):
      raise FieldError(where, f"expected a message object, got {type(m).__name__}")
    role = get_field(m, "role", str, f"{where}.role")
    if role not in ROLES:
      raise FieldError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    out.append({"role": role, "content": get_field(m, "content", str, f"{where}.content")})
  return out


def check_prompt(messages: list[dict], name: str) -> list[dict]:
  """A prompt holds a user message and ends before the reply (not on an assistant message)."""
  if not any(m["role"] == "user" for m in messages):
    raise FieldError(name, "no user message")
  if messages[-1]["role"] == "assistant":
    raise FieldError(name, "ends with an assistant message (the prompt must end before the reply)")
  return messages


def prompt_field(record: dict, name: str = "prompt") -> list[dict]:
  value = record.get(name)
  if isinstance(value, str):
    return [{"role": "user", "content": nonempty(value, name)}]
  if value is None:
    raise FieldError(name, "missing")
  return check_prompt(messages_field(value, name), name)


def response_field(value, name: str) -> str:
  """A reply: a string, or a list holding one assistant message."""
  if isinstance(value, str):
    return nonempty(value, name)
  if value is None:
    raise FieldError(name, "missing")
  messages = messages_field(value, name)
  if len(messages) != 1 or messages[0]["role"] != "assistant":
    raise FieldError(name, f"expected one assistant message, got {len(messages)} message(s) "
                           f"({', '.join(m['role'] for m in messages)})")
  return nonempty(messages[0]["content"], name)


def _group(record: dict, example: dict) -> dict:
  if record.get("group") is not None:
    g = record["group"]
    if isinstance(g, bool) or not isinstance(g, (str, int)):
      raise FieldError("group", f"expected a string or an integer, got {type(g).__name__}")
    example["group"] = str(g)
  return example


def _implicit_prompt(record: dict) -> tuple[list[dict], str, str]:
  """TRL's implicit prompt: chosen and rejected are conversations; the prompt is their shared leading messages
  and each must end in one assistant message after it."""
  if not (isinstance(record.get("chosen"), list) and isinstance(record.get("rejected"), list)):
    raise FieldError("prompt", "missing (needed unless chosen and rejected are both lists of messages)")
  chosen, rejected = messages_field(record["chosen"], "chosen"), messages_field(record["rejected"], "rejected")
  n = 0
  while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
    n += 1
  prompt = check_prompt(chosen[:n], "chosen") if n else []
  if not prompt:
    raise FieldError("chosen", "no shared leading messages with 'rejected' (the implicit prompt)")
  return prompt, response_field(chosen[n:], "chosen"), response_field(rejected[n:], "rejected")


def parse_preference(record: dict) -> dict:
  if "prompt" in record:
    prompt = prompt_field(record)
    chosen, rejected = response_field(record.get("chosen"), "chosen"), response_field(record.get("rejected"),
                                                                                        "rejected")
  else:
    prompt, chosen, rejected = _implicit_prompt(record)
  return _group(record, check_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}))


def parse_unpaired_preference(record: dict) -> dict:
  label = record.get("label")
  if label is None:
    raise FieldError("label", "missing")
  if label not in (0, 1):  # True == 1 and False == 0, so bools pass.
    raise FieldError("label", f"must be true/false or 1/0, got {label!r}")
  example = {"prompt": prompt_field(record), "response": response_field(record.get("completion"), "completion"),
             "label": float(label)}
  return _group(record, example)


def parse_messages(record: dict) -> dict:
  messages = messages_field(record.get("messages"), "messages")
  first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
  if first_user is None or not any(m["role"] == "assistant" for m in messages[first_user:]):
    raise FieldError("messages", "no assistant message after a user message (nothing to train on)")
  return _group(record, {"messages": messages, "group": messages[first_user]["content"]})


def parse_prompt(record: dict) -> dict:
  prompt = prompt_field(record)
  return _group(record, {"prompt": prompt, "group": next(m["content"] for m in prompt if m["role"] == "user")})


def _reader(parse):
  def read(path, *, skip_invalid: bool = False, skipped: list | None = None) -> Iterator[dict]:
    return read_records(path, parse, skip_invalid, skipped)
  read.__doc__ = f"Records of `path` through {parse.__name__} (module docstring)."
  return read


read_preference = _reader(parse_preference)
read_unpaired_preference = _reader(parse_unpaired_preference)
read_messages = _reader(parse_messages)
read_prompt_records = _reader(parse_prompt)
