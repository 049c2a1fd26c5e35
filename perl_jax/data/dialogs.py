"""Whole dialogs (for SFT) and RL prompt sets, read from the same files as the reward data.

  dialog: {"messages": [{"role": "user" | "assistant", "content": str}, ...], "group": str}
  prompt: {"prompt": messages (ending right before an assistant turn), "group": str}
`group` names the conversation a record comes from; `split_by_group` keeps a conversation on one side of a
train / held-out split, so no held-out conversation is trained on.

Taskmaster-4 dialogs (dialogs.jsonl.gz) hold API calls and their results as annotations on the user
utterance that triggered them ({"name": "api_call", "value": FN}, {"name": "request", "value": JSON args},
{"name": "api_response", "value": FN}, {"name": "response", "value": JSON result}, in that order per call).
Each call becomes an assistant turn "API call: FN {args}" and its result a user turn "API response: FN {...}",
after the user's text: exactly what `readers.render_tm4_turn` makes of the reward data's context turns, so SFT
targets look like the responses the reward model scores. A call without a request has no arguments ({}).
"""
from typing import Iterator

from perl_jax.data import files, generic, pipeline, readers
from perl_jax.data.files import FieldError, get_field, loads_field, read_records
from perl_jax.errors import DataError

_SPEAKERS = ("user", "assistant")


# ---------------------------------------------------------------- Taskmaster-4 dialogs


def _api_turns(annotations: list, name: str) -> list[dict]:
  """Annotations of one utterance -> reward-style TM-4 turns: [{"role": "agent", "api": {FN: args}},
  {"role": "api", "response": {FN: result}}, ...] in call order."""
  turns = []
  for j, a in enumerate(annotations):
    where = f"{name}.annotations[{j}]"
    if not isinstance(a, dict):
      raise FieldError(where, f"expected an object, got {type(a).__name__}")
    kind, value = get_field(a, "name", str, f"{where}.name"), get_field(a, "value", str, f"{where}.value")
    last = turns[-1] if turns else {}
    if kind == "api_call":
      turns.append({"role": "agent", "api": {value: {}}})
    elif kind == "request" and last.get("role") == "agent":
      last["api"] = {fn: loads_field(value, f"{where}.value", dict) for fn in last["api"]}
    elif kind == "api_response" and last.get("role") == "agent" and value in last["api"]:
      turns.append({"role": "api", "response": {value: None}})
    elif kind == "response" and last.get("role") == "api" and None in last["response"].values():
      last["response"] = {fn: loads_field(value, f"{where}.value", dict) for fn in last["response"]}
    else:
      raise FieldError(f"{where}.name", f"unexpected {kind!r} here (expected api_call, request, "
                                         "api_response (same function), response, in that order)")
  if turns and (turns[-1]["role"] != "api" or None in turns[-1]["response"].values()):
    raise FieldError(f"{name}.annotations", "API call without a complete api_response/response")
  return turns


def parse_tm4_utterance(u, name: str) -> list[dict]:
  """One TM-4 utterance -> messages: its text (user / assistant), then its API calls and results."""
  if not isinstance(u, dict):
    raise FieldError(name, f"expected an utterance object, got {type(u).__name__}")
  speaker = get_field(u, "speaker", str, f"{name}.speaker")
  if speaker not in _SPEAKERS:
    raise FieldError(f"{name}.speaker", f"must be 'user' or 'assistant', got {speaker!r}")
  text = get_field(u, "text", str, f"{name}.text").strip()
  if not text:
    raise FieldError(f"{name}.text", "empty")
  calls = _api_turns(get_field(u, "annotations", list, f"{name}.annotations"), name)
  return [{"role": speaker, "content": text}] + [
      readers.render_tm4_turn(t, f"{name}.annotations") for t in calls]


def parse_tm4_dialog(record: dict) -> dict:
  """A dialogs.jsonl line -> {"messages", "group": conversation_id}."""
  group = get_field(record, "conversation_id")
  utterances = get_field(record, "utterances", list)
  if not utterances:
    raise FieldError("utterances", "empty")
  messages = [m for i, u in enumerate(utterances) for m in parse_tm4_utterance(u, f"utterances[{i}]")]
  return {"messages": messages, "group": group}


def read_tm4_dialogs(path, *, skip_invalid: bool = False, skipped: list | None = None) -> Iterator[dict]:
  """Taskmaster-4 dialog lines {"conversation_id", "utterances", ...} -> dialogs."""
  return read_records(path, parse_tm4_dialog, skip_invalid, skipped)


# ---------------------------------------------------------------- dialogs of any format


DIALOG_READERS = {"messages": generic.read_messages, "taskmaster4_dialogs": read_tm4_dialogs}
SFT_FORMATS = sorted(DIALOG_READERS) + sorted(readers.READERS)


def example_dialog(example: dict) -> dict:
  """A preference example -> the dialog that ends in its preferred reply (chosen, or a label-1 response)."""
  reply = example["chosen"] if "chosen" in example else example["response"]
  return {"messages": example["prompt"] + [{"role": "assistant", "content": reply}],
          "group": pipeline.first_user_turn(example)}


def read_dialogs(fmt: str, path, **kwargs) -> list[dict]:
  """Whole dialogs: a DIALOG_READERS format, or a preference format's preferred dialogs (pairwise: prompt +
  chosen; binary: prompt + response of the label-1 examples). A DataError naming the file if there are none."""
  if fmt in DIALOG_READERS:
    dialogs = list(DIALOG_READERS[fmt](path, **kwargs))
  elif fmt in readers.READERS:
    dialogs = [example_dialog(e) for e in readers.READERS[fmt](path, **kwargs) if e.get("label", 1.0) > 0.5]
  else:
    raise DataError(path, field="format", problem=f"unknown dialog format {fmt!r} (one of {SFT_FORMATS})")
  if not dialogs:
    raise DataError(path, problem="no dialogs")
  return dialogs


# ---------------------------------------------------------------- RL prompt sets


def dialog_prompts(dialog: dict) -> list[dict]:
  """Every prefix of a dialog that ends right before an assistant turn and holds a user turn."""
  m = dialog["messages"]
  return [{"prompt": m[:i], "group": dialog["group"]} for i in range(len(m))
          if m[i]["role"] == "assistant" and any(t["role"] == "user" for t in m[:i])]


def _tm4_reward_prompt(record: dict) -> dict:
  return {"prompt": readers.parse_tm4_record(record)["prompt"], "group": get_field(record, "conversation_id")}


PROMPT_FORMATS = ["messages", "prompt", "taskmaster4_dialogs"] + sorted(readers.READERS)


def _prompts(fmt: str, path, **kwargs) -> Iterator[dict]:
  if fmt in DIALOG_READERS:
    return (p for d in DIALOG_READERS[fmt](path, **kwargs) for p in dialog_prompts(d))
  if fmt == "prompt":
    return generic.read_prompt_records(path, **kwargs)
  if fmt == "taskmaster4":  # Grouped by conversation, as the dialogs are.
    return read_records(path, _tm4_reward_prompt, kwargs.get("skip_invalid", False), kwargs.get("skipped"))
  if fmt in readers.READERS:
    return ({"prompt": e["prompt"], "group": pipeline.first_user_turn(e)} for e in readers.READERS[fmt](path, **kwargs))
  raise DataError(path, field="format", problem=f"unknown prompt format {fmt!r} (one of {PROMPT_FORMATS})")


def read_prompts(fmt: str, path, **kwargs) -> list[dict]:
  """RL prompts: "messages" and "taskmaster4_dialogs" every prefix before an assistant turn, "prompt" each
  record's prompt, "taskmaster4" a reward line's context, any other preference format each example's prompt.
  Prompts without a user turn are left out, and so are repeats of an identical prompt (the first one's group is
  kept), so no prompt is on both sides of a split. An empty set is a DataError naming the file. Without a
  `skipped` list, what skip_invalid skips is logged as one line."""
  if "skipped" not in kwargs:
    skipped: list = []
    prompts = read_prompts(fmt, path, **kwargs, skipped=skipped)
    files.log_skipped(path, skipped)
    return prompts
  seen, prompts = set(), []
  for p in _prompts(fmt, path, **kwargs):
    key = tuple((m["role"], m["content"]) for m in p["prompt"])
    if key not in seen and any(m["role"] == "user" for m in p["prompt"]):
      seen.add(key)
      prompts.append(p)
  if not prompts:
    raise DataError(path, problem="no prompts")
  return prompts


def split_by_group(items, eval_fraction: float, *, seed: int = 0):
  """(train, held_out) by the seeded hash of item["group"] (pipeline.split_train_eval): a conversation's
  dialogs and prompts all land on one side."""
  return pipeline.split_train_eval(items, eval_fraction, seed=seed, key_fn=lambda item: str(item["group"]))
