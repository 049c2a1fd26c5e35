"""Tokenisation, truncation, fixed-shape batching and a resumable, host-sharded iterator.

Pairwise batch: input_ids / attention_mask / response_mask int32[B, 2, T] (0 = chosen, 1 = rejected).
Binary batch:   input_ids / attention_mask / response_mask int32[B, T], label float32[B].
Both also carry valid int32[B]: 0 only on filler rows of a padded final batch (drop_remainder=False).
"""
import hashlib
import json
import logging
from typing import Callable, Sequence

import numpy as np

from perl_jax.data import files

log = logging.getLogger("perl_jax")


def has_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: Sequence[dict]) -> str:
  """Prompt text ending where the assistant reply starts: chat template if any, else 'role: content'."""
  if not has_chat_template(tokenizer):
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"
  if not prompt:
    return _generation_prefix(tokenizer)
  return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)


def _generation_prefix(tokenizer) -> str:
  """What the template appends to open an assistant turn; the whole prompt when context is empty
  (6 TM-4 reward lines have none), since templates refuse an empty conversation."""
  probe = [{"role": "user", "content": "x"}]
  with_prefix = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
  without = tokenizer.apply_chat_template(probe, add_generation_prompt=False, tokenize=False)
  if not with_prefix.startswith(without):
    raise ValueError("chat template cannot render an empty prompt")
  return with_prefix[len(without):]


def tokenize_prompts(tokenizer, prompts: Sequence[Sequence[dict]]) -> list[list[int]]:
  """Token ids of each rendered prompt; the template carries its own special tokens."""
  texts = [render_prompt(tokenizer, p) for p in prompts]
  special = not has_chat_template(tokenizer)
  return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]] if texts else []


def tokenize_responses(tokenizer, responses: Sequence[str]) -> list[list[int]]:
  """Response ids followed by the eos (end-of-turn) id, so the reward reads a finished turn."""
  if not responses:
    return []
  lead = "" if has_chat_template(tokenizer) else " "
  eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  ids = tokenizer([lead + r for r in responses], add_special_tokens=False)["input_ids"]
  return [list(x) + eos for x in ids]


def pad_id(tokenizer) -> int:
  for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if candidate is not None:
      return int(candidate)
  return 0


def truncate(prompt_ids, responses_ids, max_len: int, min_prompt_tokens: int):
  """Fits prompt + each response into max_len; returns (prompt_ids, responses_ids, truncated).

  Responses are kept whole unless one alone exceeds max_len - min_prompt_tokens (then it is cut
  from the right); the prompt, shared by all responses, is cut from the left.
  """
  if not 0 <= min_prompt_tokens < max_len:
    raise ValueError(f"need 0 <= min_prompt_tokens < max_len, got {min_prompt_tokens=} {max_len=}")
  budget = max_len - min_prompt_tokens
  cut_responses = [r if len(r) <= budget else r[:budget] for r in responses_ids]
  keep = max_len - max(len(r) for r in cut_responses)
  cut_prompt = prompt_ids if len(prompt_ids) <= keep else prompt_ids[len(prompt_ids) - keep:]
  truncated = len(cut_prompt) < len(prompt_ids) or any(
      len(a) < len(b) for a, b in zip(cut_responses, responses_ids))
  return cut_prompt, cut_responses, truncated


def _fill_row(ids_T, attn_T, resp_T, prompt_ids, response_ids):
  n_prompt, n = len(prompt_ids), len(prompt_ids) + len(response_ids)
  ids_T[:n_prompt] = prompt_ids
  ids_T[n_prompt:n] = response_ids
  attn_T[:n] = 1
  resp_T[n_prompt:n] = 1


def _encode(prompts, responses_per_example, tokenizer, max_len, min_prompt_tokens):
  """Shared core: (input_ids, attention_mask, response_mask) int32[N, K, T] and #truncated.

  `truncate` checks 0 <= min_prompt_tokens < max_len for every example.
  """
  n, k = len(prompts), len(responses_per_example[0]) if responses_per_example else 1
  prompt_ids = tokenize_prompts(tokenizer, prompts)
  response_ids = tokenize_responses(tokenizer, [r for rs in responses_per_example for r in rs])
  ids_NKT = np.full((n, k, max_len), pad_id(tokenizer), np.int32)
  attn_NKT = np.zeros((n, k, max_len), np.int32)
  resp_NKT = np.zeros((n, k, max_len), np.int32)
  num_truncated = 0
  for i in range(n):
    p_ids, r_ids, truncated = truncate(prompt_ids[i], response_ids[i * k:(i + 1) * k], max_len, min_prompt_tokens)
    num_truncated += truncated
    for j in range(k):
      _fill_row(ids_NKT[i, j], attn_NKT[i, j], resp_NKT[i, j], p_ids, r_ids[j])
  if num_truncated:
    logging.info("truncated %d of %d examples to max_len=%d", num_truncated, n, max_len)
  return ids_NKT, attn_NKT, resp_NKT, num_truncated


def encode_pairwise(examples: Sequence[dict], tokenizer, max_len: int, *, min_prompt_tokens: int = 64):
  """Pairwise examples -> ({input_ids, attention_mask, response_mask: int32[N, 2, T]}, #truncated).

  Chosen and rejected share one prompt cut, so both are scored against the same context.
  """
  ids_N2T, attn_N2T, resp_N2T, num_truncated = _encode(
      [e["prompt"] for e in examples], [(e["chosen"], e["rejected"]) for e in examples],
      tokenizer, max_len, min_prompt_tokens)
  return {"input_ids": ids_N2T, "attention_mask": attn_N2T, "response_mask": resp_N2T}, num_truncated


def encode_binary(examples: Sequence[dict], tokenizer, max_len: int, *, min_prompt_tokens: int = 64):
  """Binary examples -> ({input_ids, attention_mask, response_mask: int32[N, T], label: f32[N]}, #truncated)."""
  ids_N1T, attn_N1T, resp_N1T, num_truncated = _encode(
      [e["prompt"] for e in examples], [(e["response"],) for e in examples],
      tokenizer, max_len, min_prompt_tokens)
  label_N = np.asarray([e["label"] for e in examples], np.float32)
  return {"input_ids": ids_N1T[:, 0], "attention_mask": attn_N1T[:, 0], "response_mask": resp_N1T[:, 0],
          "label": label_N}, num_truncated


def first_user_turn(example: dict) -> str:
  """Default split key: the record's own "group" if it has one (generic formats), else its first user turn, so
  dialogs opening with the same user turn land in the same split."""
  if "group" in example:
    return example["group"]
  for message in example["prompt"]:
    if message["role"] == "user":
      return message["content"]
  return json.dumps(example, sort_keys=True)


def split_train_eval(examples: Sequence[dict], eval_fraction: float, *, seed: int | str = 0,
                     key_fn: Callable[[dict], str] = first_user_turn):
  """Deterministic (train, eval) lists by a seeded stable hash of key_fn(example).

  Hashing a key instead of permuting positions keeps the split fixed under reordering or
  appending data, and keeps related examples (e.g. TM-4 turns of one scenario) together.
  """
  if not 0.0 <= eval_fraction <= 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
  train, held_out = [], []
  for example in examples:
    digest = hashlib.sha256(f"{seed}\x00{key_fn(example)}".encode()).digest()
    (held_out if int.from_bytes(digest[:8], "big") < eval_fraction * 2.0**64 else train).append(example)
  return train, held_out


class BatchIterator:
  """Global batches over encoded arrays, reshuffled each epoch, sliced per host, resumable.

  Every host computes the same permutation from (seed, epoch); process i of n yields rows
  [i*B/n, (i+1)*B/n) of each global batch of size B. get_state()/set_state() restore the
  exact position, so a restored iterator yields what an uninterrupted one would have.

  Length buckets (right-padded rows): with `buckets` (ascending lengths), the sequence fields of
  each batch are cut to the smallest bucket that holds the global batch's longest row; exact,
  since pads after a row's last token change nothing, and the step compiles once per bucket.
  `group_by_length` orders each epoch so batches hold similar lengths: shuffled (seeded by
  epoch) chunks of `group_batches` batches, sorted by length inside a chunk, batch order
  shuffled; without shuffle, rows go longest first. Every row is still seen once per epoch.
  """

  def __init__(self, arrays: dict, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
               num_epochs: int | None = None, drop_remainder: bool = True,
               process_index: int | None = None, process_count: int | None = None,
               buckets: Sequence[int] = (), group_by_length: bool = False, group_batches: int = 32):
    if process_index is None or process_count is None:
      import jax
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size {global_batch_size} not divisible by {process_count} hosts")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.arrays = arrays
    self.num_examples = len(next(iter(arrays.values())))
    if any(len(v) != self.num_examples for v in arrays.values()):
      raise ValueError("all arrays need the same leading dimension")
    self.global_batch_size = global_batch_size
    self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
    self.drop_remainder = drop_remainder
    self.host_batch_size = global_batch_size // process_count
    self.host_start = process_index * self.host_batch_size
    full, rest = divmod(self.num_examples, global_batch_size)
    self.steps_per_epoch = full + (0 if drop_remainder or not rest else 1)
    if self.steps_per_epoch == 0:
      raise ValueError(f"{self.num_examples} examples give no batch of {global_batch_size}")
    self.epoch, self.step = 0, 0
    self._order = None
    self.buckets = tuple(sorted(buckets))
    self.group_by_length, self.group_batches = group_by_length, group_batches
    self.lengths = row_lengths(arrays) if (self.buckets or group_by_length) else None

  def _epoch_order(self):
    if self._order is None or self._order[0] != self.epoch:
      order = np.arange(self.num_examples)
      rng = np.random.default_rng([self.seed, self.epoch])
      if self.shuffle:
        order = rng.permutation(self.num_examples)
      if self.group_by_length:
        order = length_grouped(order, self.lengths, self.global_batch_size, self.group_batches,
                               rng if self.shuffle else None)
      self._order = (self.epoch, order)
    return self._order[1]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    order = self._epoch_order()
    positions = self.step * self.global_batch_size + self.host_start + np.arange(self.host_batch_size)
    valid = (positions < self.num_examples).astype(np.int32)
    rows = order[positions % self.num_examples]
    batch = {k: v[rows] for k, v in self.arrays.items()}
    if self.buckets:
      global_rows = order[(self.step * self.global_batch_size + np.arange(self.global_batch_size)) % self.num_examples]
      batch = cut_to_bucket(batch, int(self.lengths[global_rows].max()), self.buckets)
    batch["valid"] = valid
    self.step += 1
    if self.step == self.steps_per_epoch:
      self.epoch, self.step = self.epoch + 1, 0
    return batch

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size}

  def set_state(self, state: dict) -> None:
    for key in ("seed", "num_examples", "global_batch_size"):
      if state[key] != getattr(self, key):
        raise ValueError(f"iterator state has {key}={state[key]}, this iterator {getattr(self, key)}")
    if not 0 <= state["step"] < self.steps_per_epoch:
      raise ValueError(f"iterator state step {state['step']} not in [0, {self.steps_per_epoch})")
    self.epoch, self.step = int(state["epoch"]), int(state["step"])


SEQUENCE_KEYS = ("input_ids", "attention_mask", "response_mask", "loss_mask")


def row_lengths(arrays: dict) -> np.ndarray:
  """Tokens per example (the longest of a pair), from attention_mask [N,T] or [N,K,T]."""
  mask = arrays["attention_mask"]
  lengths = mask.reshape(len(mask), -1, mask.shape[-1]).sum(-1).max(-1)
  return lengths.astype(np.int64)


def length_grouped(order: np.ndarray, lengths: np.ndarray, batch_size: int, group_batches: int, rng) -> np.ndarray:
  """Rows reordered so each batch holds similar lengths: chunks of `group_batches` batches sorted by length
  (longest first); with an rng, the batches are then shuffled (a partial last batch stays last)."""
  chunk = batch_size * group_batches
  parts = [o[np.argsort(-lengths[o], kind="stable")] for o in np.split(order, range(chunk, len(order), chunk))]
  order = np.concatenate(parts)
  if rng is None:
    return order
  full = len(order) // batch_size
  batches = order[:full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
  return np.concatenate([batches.reshape(-1), order[full * batch_size:]])


def cut_to_bucket(batch: dict, longest: int, buckets: Sequence[int]) -> dict:
  """Sequence fields cut to the smallest bucket >= `longest` (the last bucket if none is)."""
  length = next((b for b in buckets if b >= longest), buckets[-1])
  return {k: v[..., :length] if k in SEQUENCE_KEYS else v for k, v in batch.items()}


def default_buckets(max_len: int, step: int = 64) -> tuple[int, ...]:
  """Bucket lengths step, 2*step, ... below max_len, then max_len: a few fixed compiled shapes."""
  return tuple(range(step, max_len, step)) + (max_len,)


def order_seed(dc) -> int:
  """The batch-order seed: data.shuffle_seed, or data.seed (which also fixes the held-out split) when it is < 0,
  so seeds of an ablation can vary the order while every point keeps the same held-out split."""
  return dc.seed if dc.get("shuffle_seed", -1) < 0 else dc.shuffle_seed


def eval_iterator(arrays: dict, batch_size: int, **kwargs) -> "BatchIterator":
  """Every example once, in order of length within `default_buckets` of the arrays' width (longest first; a
  partial last batch padded with filler rows, valid = 0): the iterator every eval and scoring pass uses."""
  return BatchIterator(arrays, batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
                       buckets=default_buckets(arrays["input_ids"].shape[-1]), group_by_length=True, **kwargs)


def read_train_eval(read: Callable, split: Callable, dc) -> tuple[list, list]:
  """(train, eval) records of a data config: read(path, skip_invalid=, skipped=) of data.path, split by
  split(records, data.eval_fraction, seed=data.seed), or data.eval_path read whole as the eval part. Lines
  skipped under data.skip_invalid are counted in a warning."""
  records = read_logged(read, dc.path, dc.skip_invalid)
  if dc.eval_path:
    return records, read_logged(read, dc.eval_path, dc.skip_invalid)
  return split(records, dc.eval_fraction, seed=dc.seed)


def read_logged(read: Callable, path, skip_invalid: bool) -> list:
  """read(path, skip_invalid=, skipped=), with one warning line for what it skipped (files.log_skipped)."""
  skipped: list = []
  records = read(path, skip_invalid=skip_invalid, skipped=skipped)
  files.log_skipped(path, skipped)
  return records


def check_one_batch(dc, n: int, what: str) -> None:
  """A training set smaller than one global batch is a one-line DataError naming data.path."""
  if n < dc.batch_size:
    raise files.DataError(dc.path, field="data.batch_size", problem=(
        f"{n} training {what} (after the held-out split and skipped records), fewer than one batch of "
        f"{dc.batch_size}; lower data.batch_size or add data"))


def train_iterator(arrays: dict, dc) -> "BatchIterator":
  """The training iterator a data config asks for: global batch data.batch_size, seed `order_seed(dc)`, and
  with data.bucket_by_length, batches grouped by length and cut to `default_buckets(data.max_len)`."""
  bucketed = dc.get("bucket_by_length", False)
  return BatchIterator(arrays, dc.batch_size, seed=order_seed(dc), group_by_length=bucketed,
                       buckets=default_buckets(dc.max_len) if bucketed else ())
