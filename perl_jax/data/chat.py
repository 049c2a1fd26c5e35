"""Whole-dialog SFT sequences with a loss mask on assistant turns, and left-padded RL prompt batches.

SFT batch:    input_ids / attention_mask / loss_mask int32[N, T], right-padded. loss_mask is 1 exactly on the
              tokens of every assistant turn's content and the end-of-turn (eos) token after it; role headers,
              user turns, separators and padding are 0. A dialog's opening assistant turn (before any user
              turn, e.g. a greeting) is context, not a target. Dialogs longer than max_len keep their first
              max_len tokens (the earliest turns; later targets are lost) and are counted as truncated.
Prompt batch: input_ids / attention_mask int32[N, P], left-padded so every row ends at column P-1 with the
              generation prefix; prompts longer than P keep their last P tokens, counted as truncated.

With a chat template, the sequence is built by rendering turns[:i+1] for each i and tokenizing what each
render adds (the template's own special tokens included); every render must extend the previous one (prefix
stability) and the concatenated pieces must equal the tokenized whole dialog, or a ValueError says so.
Without a template the format is pipeline.render_prompt's: "role: content\\n" lines, each assistant turn being
"assistant:" + target " content" + eos, then "\\n" (the tokenizer's special tokens, e.g. BOS, lead).
"""
from typing import Sequence

import numpy as np

from perl_jax.data import pipeline


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
  return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text or special else []


def _render(tokenizer, messages, generation: bool = False) -> str:
  if not messages:
    return ""
  return tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation, tokenize=False)


def _eos(tokenizer) -> int:
  if tokenizer.eos_token_id is None:
    raise ValueError("SFT needs an eos (end-of-turn) token; the tokenizer has none")
  return int(tokenizer.eos_token_id)


def _is_target(messages, i: int) -> bool:
  """Assistant turns after the first user turn are targets."""
  return messages[i]["role"] == "assistant" and any(m["role"] == "user" for m in messages[:i])


def template_tokens(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
  """(ids, target flags) of a dialog under the tokenizer's chat template, built turn by turn.

  For target turn i: header = render(turns[:i], generation prompt) - render(turns[:i]) is not a target;
  content + the eos that the template puts right after it are; the rest of the turn (e.g. "\\n") is not."""
  ids, flags, done, eos = [], [], "", _eos(tokenizer)

  def add(piece_ids, flag):
    ids.extend(piece_ids)
    flags.extend([flag] * len(piece_ids))

  for i, m in enumerate(messages):
    full, target = _render(tokenizer, messages[:i + 1]), _is_target(messages, i)
    head = _render(tokenizer, messages[:i], generation=True) if target else full
    if not (full.startswith(done) and head.startswith(done) and full.startswith(head)):
      raise ValueError(f"chat template is not prefix-stable at turn {i}: rendering turns[:{i + 1}] does not "
                       f"extend rendering turns[:{i}]")
    add(_ids(tokenizer, head[len(done):]), 0)
    if target:
      if not full.startswith(head + m["content"]):
        raise ValueError(f"chat template changes the content of assistant turn {i}")
      tail = _ids(tokenizer, full[len(head) + len(m["content"]):])
      if not tail or tail[0] != eos:
        raise ValueError(f"chat template does not end assistant turn {i} with the eos token {tokenizer.eos_token!r}")
      add(_ids(tokenizer, m["content"]) + [eos], 1)
      add(tail[1:], 0)
    done = full
  if ids != _ids(tokenizer, done):
    raise ValueError("tokenizing the dialog turn by turn differs from tokenizing it whole (not prefix-stable)")
  return ids, flags


def plain_tokens(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
  """(ids, target flags) in the 'role: content' format of pipeline.render_prompt (no chat template)."""
  ids, flags = _ids(tokenizer, "", special=True), []
  flags.extend([0] * len(ids))
  for i, m in enumerate(messages):
    if _is_target(messages, i):
      pieces = [(_ids(tokenizer, "assistant:"), 0), (_ids(tokenizer, " " + m["content"]) + [_eos(tokenizer)], 1),
                (_ids(tokenizer, "\n"), 0)]
    else:
      pieces = [(_ids(tokenizer, f"{m['role']}: {m['content']}\n"), 0)]
    for piece_ids, flag in pieces:
      ids.extend(piece_ids)
      flags.extend([flag] * len(piece_ids))
  return ids, flags


def dialog_tokens(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
  """(ids, loss flags) of one whole dialog: the chat template if the tokenizer has one, else 'role: content'."""
  if pipeline.has_chat_template(tokenizer):
    return template_tokens(tokenizer, messages)
  return plain_tokens(tokenizer, messages)


def encode_sft(dialogs: Sequence[dict], tokenizer, max_len: int) -> tuple[dict, int]:
  """Dialogs {"messages": [...]} -> ({input_ids, attention_mask, loss_mask: int32[N, T=max_len]}, #truncated).

  Right-padded with pipeline.pad_id; a dialog longer than max_len keeps its first max_len tokens."""
  n = len(dialogs)
  ids_NxT = np.full((n, max_len), pipeline.pad_id(tokenizer), np.int32)
  attn_NxT = np.zeros((n, max_len), np.int32)
  loss_NxT = np.zeros((n, max_len), np.int32)
  num_truncated = 0
  for row, dialog in enumerate(dialogs):
    ids, flags = dialog_tokens(tokenizer, dialog["messages"])
    num_truncated += len(ids) > max_len
    k = min(len(ids), max_len)
    ids_NxT[row, :k], attn_NxT[row, :k], loss_NxT[row, :k] = ids[:k], 1, flags[:k]
  return {"input_ids": ids_NxT, "attention_mask": attn_NxT, "loss_mask": loss_NxT}, num_truncated


def encode_prompts(prompts: Sequence[dict], tokenizer, max_prompt_len: int) -> tuple[dict, int]:
  """Prompts {"prompt": [...]} -> ({input_ids, attention_mask: int32[N, P=max_prompt_len]}, #truncated).

  Rendered like the RM's prompts (pipeline.tokenize_prompts: ends with the generation prefix), left-padded;
  a longer prompt keeps its last P tokens (the generation prefix and the latest turns)."""
  rows = pipeline.tokenize_prompts(tokenizer, [p["prompt"] for p in prompts])
  n = len(rows)
  ids_NxP = np.full((n, max_prompt_len), pipeline.pad_id(tokenizer), np.int32)
  attn_NxP = np.zeros((n, max_prompt_len), np.int32)
  num_truncated = 0
  for row, ids in enumerate(rows):
    num_truncated += len(ids) > max_prompt_len
    kept = ids[-max_prompt_len:]
    ids_NxP[row, max_prompt_len - len(kept):], attn_NxP[row, max_prompt_len - len(kept):] = kept, 1
  return {"input_ids": ids_NxP, "attention_mask": attn_NxP}, num_truncated
