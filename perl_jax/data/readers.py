"""Preference data readers: the generic (TRL-style) formats of `generic` and the paper's data sets (HH-RLHF,
Taskmaster-4, TL;DR, SHP), any file kind of `files` (JSON lines, Parquet, Arrow).

Every reader yields plain dicts in one of two shapes:
  pairwise: {"prompt": messages, "chosen": str, "rejected": str}
  binary:   {"prompt": messages, "response": str, "label": float}
where messages is a list of {"role": "system" | "user" | "assistant", "content": str} (generic records may add
"group", the split key). Bad input raises DataError("FILE:LINE: field 'NAME': what is wrong").
"""
import json
import os
import re
from typing import Any, Iterator

from perl_jax.data import generic
from perl_jax.data.files import FieldError, binary_choice, check_pair, get_field, loads_field, nonempty, read_records
from perl_jax.errors import DataError  # noqa: F401 (data.DataError)

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN_RE = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_TM4_ROLES = {"agent": "assistant", "user": "user", "api": "user"}


# ---------------------------------------------------------------- HH-RLHF (pairwise)


def split_hh_dialog(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
  """Splits two HH dialogs into their shared prompt messages and the two final replies.

  The split point is the last "\\n\\nAssistant:" inside the common prefix, so replies that
  themselves contain "Human:" or "Assistant:" text (they exist in HH) stay whole.
  """
  common = len(os.path.commonprefix([chosen, rejected]))
  cut = chosen.rfind(HH_ASSISTANT, 0, common + len(HH_ASSISTANT))
  while cut >= 0 and not rejected.startswith(HH_ASSISTANT, cut):
    cut = chosen.rfind(HH_ASSISTANT, 0, cut)
  if cut < 0:
    raise FieldError("chosen", "no shared prefix ending in '\\n\\nAssistant:'")
  prompt = parse_hh_turns(chosen[:cut])
  if not any(m["role"] == "user" for m in prompt):
    raise FieldError("chosen", "no Human turn before the final Assistant turn")
  start = cut + len(HH_ASSISTANT)
  return prompt, nonempty(chosen[start:], "chosen"), nonempty(rejected[start:], "rejected")


def parse_hh_turns(text: str) -> list[dict]:
  """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{"role": "user", "content": "a"}, ...]."""
  parts = _HH_TURN_RE.split(text)
  messages = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
  for speaker, content in zip(parts[1::2], parts[2::2]):
    messages.append({"role": _HH_ROLES[speaker], "content": content.strip()})
  return messages


def parse_hh_record(record: dict) -> dict:
  prompt, chosen, rejected = split_hh_dialog(get_field(record, "chosen"), get_field(record, "rejected"))
  return check_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected})


def read_hh_rlhf(path, *, skip_invalid: bool = False, skipped: list | None = None) -> Iterator[dict]:
  """Anthropic HH-RLHF lines {"chosen", "rejected"} -> pairwise examples."""
  return read_records(path, parse_hh_record, skip_invalid, skipped)


# ---------------------------------------------------------------- Taskmaster-4 (binary)


def render_tm4_turn(turn: Any, name: str) -> dict:
  """One TM-4 turn -> chat message; API calls (agent) and API results (user role) become text."""
  if not isinstance(turn, dict):
    raise FieldError(name, f"expected a turn object, got {type(turn).__name__}")
  role = turn.get("role")
  if role not in _TM4_ROLES:
    raise FieldError(name, f"unknown role {role!r}")
  if role == "api":
    content = _render_calls("API response", get_field(turn, "response", dict, f"{name}.response"))
  elif "api" in turn:
    content = _render_calls("API call", get_field(turn, "api", dict, f"{name}.api"))
  else:
    content = get_field(turn, "text", str, f"{name}.text")
  return {"role": _TM4_ROLES[role], "content": content}


def _render_calls(kind: str, calls: dict) -> str:
  return "\n".join(f"{kind}: {fn} {json.dumps(args, ensure_ascii=False)}" for fn, args in calls.items())


def _json_field(record: dict, field: str, kind) -> Any:
  return loads_field(get_field(record, field), field, kind)


def parse_tm4_record(record: dict) -> dict:
  context = _json_field(record, "context", list)
  prompt = [render_tm4_turn(turn, f"context[{i}]") for i, turn in enumerate(context)]
  generation = _json_field(record, "generation", dict)
  if generation.get("role") != "agent":
    raise FieldError("generation", f"role must be 'agent', got {generation.get('role')!r}")
  response = render_tm4_turn(generation, "generation")["content"]
  reward = get_field(record, "reward", float)
  if reward not in (0.0, 1.0):
    raise FieldError("reward", f"must be 0.0 or 1.0, got {reward!r}")
  return {"prompt": prompt, "response": nonempty(response, "generation"), "label": reward}


def read_taskmaster4(path, *, skip_invalid: bool = False, skipped: list | None = None) -> Iterator[dict]:
  """PERL's Taskmaster-4 reward lines {"context", "generation", "reward"} -> binary examples."""
  return read_records(path, parse_tm4_record, skip_invalid, skipped)


# ---------------------------------------------------------------- TL;DR comparisons (pairwise)


def tldr_prompt(info: dict) -> str:
  """The Stiennon et al. (2020) prompt: SUBREDDIT / TITLE / POST lines, then 'TL;DR:'."""
  if "post" in info or "article" not in info:
    body = "POST: " + get_field(info, "post", str, "info.post")
  else:
    body = "ARTICLE: " + get_field(info, "article", str, "info.article")
  lines = []
  if info.get("subreddit"):
    lines.append(f"SUBREDDIT: r/{info['subreddit']}")
  if info.get("title"):
    lines.append(f"TITLE: {info['title']}")
  return "\n".join(lines + [body.strip(), "TL;DR:"])


def parse_tldr_record(record: dict) -> dict:
  info = get_field(record, "info", dict)
  summaries = get_field(record, "summaries", list)
  if len(summaries) != 2:
    raise FieldError("summaries", f"expected 2 summaries, got {len(summaries)}")
  texts = []
  for i, summary in enumerate(summaries):
    if not isinstance(summary, dict):
      raise FieldError(f"summaries[{i}]", f"expected an object, got {type(summary).__name__}")
    texts.append(nonempty(get_field(summary, "text", str, f"summaries[{i}].text"), f"summaries[{i}].text"))
  choice = binary_choice(get_field(record, "choice", int), "choice")
  prompt = [{"role": "user", "content": tldr_prompt(info)}]
  return check_pair({"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice]})


def read_tldr(path, *, skip_invalid: bool = False, skipped: list | None = None) -> Iterator[dict]:
  """OpenAI summarize-from-feedback comparison lines -> pairwise examples."""
  return read_records(path, parse_tldr_record, skip_invalid, skipped)


# ---------------------------------------------------------------- Stanford SHP (pairwise)


def parse_shp_record(record: dict) -> dict:
  history = get_field(record, "history").strip()
  if not history:
    raise FieldError("history", "empty")
  ref_a = nonempty(get_field(record, "human_ref_A"), "human_ref_A")
  ref_b = nonempty(get_field(record, "human_ref_B"), "human_ref_B")
  a_wins = binary_choice(get_field(record, "labels", int), "labels")
  chosen, rejected = (ref_a, ref_b) if a_wins else (ref_b, ref_a)
  return check_pair({"prompt": [{"role": "user", "content": history}], "chosen": chosen, "rejected": rejected})


def read_shp(path, *, skip_invalid: bool = False, skipped: list | None = None) -> Iterator[dict]:
  """Stanford SHP lines {"history", "human_ref_A", "human_ref_B", "labels"} -> pairwise examples."""
  return read_records(path, parse_shp_record, skip_invalid, skipped)


READERS = {"preference": generic.read_preference, "unpaired_preference": generic.read_unpaired_preference,
           "hh_rlhf": read_hh_rlhf, "taskmaster4": read_taskmaster4, "tldr": read_tldr, "shp": read_shp}
KINDS = {"preference": "pairwise", "unpaired_preference": "binary", "hh_rlhf": "pairwise", "taskmaster4": "binary",
         "tldr": "pairwise", "shp": "pairwise"}


def read_examples(fmt: str, path, **kwargs) -> list[dict]:
  """Reads a whole file of format `fmt` (a READERS key) into a list."""
  if fmt not in READERS:
    raise DataError(path, field="format", problem=f"unknown preference format {fmt!r} (one of {sorted(READERS)})")
  return list(READERS[fmt](path, **kwargs))
