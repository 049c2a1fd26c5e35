"""Whole-dialog SFT encoding (loss mask = assistant turns), TM-4 dialog reader, RL prompt sets and their split."""
import copy
import gzip
import json

import numpy as np
import pytest

from perl_jax import data, models
from perl_jax.data import dialogs, readers
from tests.conftest import ROOT
from tests.helpers import head_lines

DIALOGS = ROOT / "experiments/data/taskmaster4/dialogs.jsonl.gz"
TM4 = ROOT / "experiments/data/taskmaster4/reward.jsonl.gz"
HH = ROOT / "experiments/data/hh-rlhf-harmless/pairs.jsonl.gz"
HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
  return models.load_tokenizer(models.default_model_path())


@pytest.fixture(scope="module")
def plain_tok(tok):
  t = copy.deepcopy(tok)
  t.chat_template = None
  return t


def raw_lines(path, n):
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(next(f)) for _ in range(n)]


def masked_spans(ids_T, mask_T):
  """Contiguous runs of mask == 1, as token id lists."""
  spans, cur = [], []
  for i, m in zip(ids_T, mask_T):
    if m:
      cur.append(int(i))
    elif cur:
      spans, cur = spans + [cur], []
  return spans + ([cur] if cur else [])


# ---------------------------------------------------------------- TM-4 dialog reader


def test_tm4_dialog_turns_by_hand():
  raw = raw_lines(DIALOGS, 1)[0]
  d = next(dialogs.read_tm4_dialogs(DIALOGS))
  assert d["group"] == raw["conversation_id"] == "dlg-881444f3-24fc-4e54-ac61-2196f60e88fa"
  m = d["messages"]
  assert m[0] == {"role": "user", "content": "one Chai Latte please"}
  assert m[1] == {"role": "assistant", "content": 'API call: get_menu_items {"query": "Chai Latte"}'}
  assert m[2] == {"role": "user", "content": 'API response: get_menu_items {"menu_items": [{"menu_item_id": '
                                             '"chai-latte-1928", "name": "Chai Latte"}]}'}
  assert m[7] == {"role": "assistant", "content": raw["utterances"][1]["text"]}
  assert m[-1] == {"role": "assistant", "content": raw["utterances"][3]["text"]}
  # Each utterance gives its text, then two messages per API call.
  calls = sum(a["name"] == "api_call" for u in raw["utterances"] for a in u["annotations"])
  assert len(m) == len(raw["utterances"]) + 2 * calls


def test_tm4_dialog_api_turns_render_like_reward_contexts():
  """The reward file's agent API-call context turns, as text, have the same shape as the dialogs' ones."""
  reward_calls = {m["content"].split(" ", 3)[2] for e in data.read_taskmaster4(TM4) for m in e["prompt"]
                  if m["content"].startswith("API call: ")}
  dialog_calls = {m["content"].split(" ", 3)[2] for d in dialogs.read_dialogs("taskmaster4_dialogs", DIALOGS,
                                                                              skip_invalid=True)[:200]
                  for m in d["messages"] if m["role"] == "assistant" and m["content"].startswith("API call: ")}
  assert dialog_calls and dialog_calls <= reward_calls  # e.g. get_menu_items, add_order_item, show_menu
  no_args = [m["content"] for e in data.read_taskmaster4(TM4) for m in e["prompt"] if m["content"].endswith(" {}")]
  assert "API call: show_menu {}" in no_args  # a call without a request renders as {} in both files.


def _bad_dialog_file(tmp_path, kind):
  lines = [json.dumps(r) for r in raw_lines(DIALOGS, 4)]
  rec = json.loads(lines[2])
  if kind == "request":
    rec["utterances"][0]["annotations"][1]["value"] = '{"query": "x",'
  elif kind == "speaker":
    rec["utterances"][1]["speaker"] = "agent"
  elif kind == "order":
    rec["utterances"][0]["annotations"][2]["value"] = "not_the_called_function"
  elif kind == "utterances":
    del rec["utterances"]
  lines[2] = json.dumps(rec)
  path = tmp_path / f"{kind}.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.mark.parametrize("kind,field", [
    ("request", "field 'utterances[0].annotations[1].value': malformed JSON"),
    ("speaker", "field 'utterances[1].speaker'"),
    ("order", "field 'utterances[0].annotations[2].name': unexpected 'api_response'"),
    ("utterances", "field 'utterances': missing")])
def test_bad_dialog_line_is_one_line_error_or_skipped(tmp_path, kind, field):
  path = _bad_dialog_file(tmp_path, kind)
  with pytest.raises(data.DataError) as e:
    data.read_dialogs("taskmaster4_dialogs", path)
  assert str(e.value).startswith(f"{path}:3: {field}") and "\n" not in str(e.value)
  with pytest.raises(data.DataError, match=f"^{path}:3: "):
    data.read_prompts("taskmaster4_dialogs", path)
  skipped = []
  kept = data.read_dialogs("taskmaster4_dialogs", path, skip_invalid=True, skipped=skipped)
  assert len(kept) == 3 and len(skipped) == 1 and skipped[0].startswith(f"{path}:3: ")


def test_real_dialog_file_skips_exactly_the_malformed_json_lines():
  skipped = []
  d = data.read_dialogs("taskmaster4_dialogs", DIALOGS, skip_invalid=True, skipped=skipped)
  assert len(d) + len(skipped) == 3710
  assert skipped and all("malformed JSON" in s for s in skipped)


# ---------------------------------------------------------------- SFT encoding


def _dialog_sample():
  tm4 = dialogs.read_dialogs("taskmaster4_dialogs", DIALOGS, skip_invalid=True)[:4]
  hh = dialogs.read_dialogs("hh_rlhf", HH, skip_invalid=True)[:4]
  greeting = {"messages": [{"role": "assistant", "content": "Welcome! What can I get you?"},
                           {"role": "user", "content": "a latte"}, {"role": "assistant", "content": "Sure."}],
              "group": "g"}
  return tm4 + hh + [greeting]


def _targets(d):
  m = d["messages"]
  return [x["content"] for i, x in enumerate(m) if x["role"] == "assistant" and any(y["role"] == "user" for y in m[:i])]


def test_loss_mask_is_exactly_assistant_contents_plus_eos(tok):
  sample = _dialog_sample()
  arrays, num_truncated = data.encode_sft(sample, tok, 1024)
  assert num_truncated == 0 and all(v.dtype == np.int32 and v.shape == (len(sample), 1024) for v in arrays.values())
  for row, d in enumerate(sample):
    ids, mask, attn = arrays["input_ids"][row], arrays["loss_mask"][row], arrays["attention_mask"][row]
    spans = [tok.decode(s) for s in masked_spans(ids, mask)]
    assert spans == [c + tok.eos_token for c in _targets(d)]
    n = attn.sum()
    assert attn[:n].all() and not attn[n:].any() and not mask[n:].any()  # right-padded
    whole = tok.apply_chat_template(d["messages"], tokenize=False)
    assert tok.decode(ids[:n]) == whole
    assert list(ids[:n]) == tok(whole, add_special_tokens=False)["input_ids"]


def test_plain_format_without_chat_template(plain_tok):
  sample = _dialog_sample()[-2:]
  arrays, _ = data.encode_sft(sample, plain_tok, 1024)
  for row, d in enumerate(sample):
    ids, mask = arrays["input_ids"][row], arrays["loss_mask"][row]
    spans = [plain_tok.decode(s) for s in masked_spans(ids, mask)]
    assert spans == [" " + c + plain_tok.eos_token for c in _targets(d)]
    n = arrays["attention_mask"][row].sum()
    text = "".join(f"{m['role']}: {m['content']}{plain_tok.eos_token if i and m['role'] == 'assistant' else ''}\n"
                   for i, m in enumerate(d["messages"]))
    assert plain_tok.decode(ids[:n], skip_special_tokens=False) == plain_tok.decode(
        plain_tok(text, add_special_tokens=True)["input_ids"])


def test_long_dialog_keeps_its_first_tokens(tok):
  d = _dialog_sample()[:1]
  full, _ = data.encode_sft(d, tok, 1024)
  cut, num_truncated = data.encode_sft(d, tok, 40)
  assert num_truncated == 1 and cut["attention_mask"].all()
  for k in cut:
    np.testing.assert_array_equal(cut[k], full[k][:, :40])


def test_non_prefix_stable_template_is_refused(tok):
  t = copy.deepcopy(tok)  # A template that renders the last turn differently from earlier ones.
  t.chat_template = ("{% for m in messages %}{{ m['role'] + ('!' if loop.last else '') + ': ' + m['content'] + "
                     "eos_token }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
  with pytest.raises(ValueError, match="prefix-stable"):
    data.encode_sft(_dialog_sample()[-1:], t, 64)


# ---------------------------------------------------------------- RL prompt sets


def test_dialog_prompts_end_before_each_agent_turn(tmp_path):
  path = head_lines(DIALOGS, tmp_path / "d.jsonl", 3)
  raw = [json.loads(l) for l in path.read_text().splitlines()]
  ds = data.read_dialogs("taskmaster4_dialogs", path)
  prompts = [p for d in ds for p in dialogs.dialog_prompts(d)]
  # Agent turns = assistant utterances + API calls; none of these dialogs opens with the agent.
  agent_turns = sum(u["speaker"] == "assistant" for r in raw for u in r["utterances"]) + sum(
      a["name"] == "api_call" for r in raw for u in r["utterances"] for a in u["annotations"])
  assert len(prompts) == agent_turns
  for d in ds:
    for p in dialogs.dialog_prompts(d):
      n = len(p["prompt"])
      assert p["prompt"] == d["messages"][:n] and d["messages"][n]["role"] == "assistant"
      assert p["group"] == d["group"]
  read = data.read_prompts("taskmaster4_dialogs", path)
  assert len(read) == len({json.dumps(p["prompt"]) for p in prompts})  # identical prefixes read once


def test_reward_and_hh_prompts(tmp_path):
  tm4 = data.read_prompts("taskmaster4", head_lines(TM4, tmp_path / "r.jsonl", 20))
  raw = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
  by_id = {r["conversation_id"]: r for r in raw}
  for p in tm4:
    assert len(p["prompt"]) == len(json.loads(by_id[p["group"]]["context"]))
  hh_path = head_lines(HH, tmp_path / "hh.jsonl", 10)
  hh = data.read_prompts("hh_rlhf", hh_path)
  for p, line in zip(hh, hh_path.read_text().splitlines()):
    chosen = json.loads(line)["chosen"]
    before_last = chosen[:chosen.rfind("\n\nAssistant:")]  # these lines' replies hold no turn markers
    assert p["prompt"] == readers.parse_hh_turns(before_last) and p["prompt"][-1]["role"] == "user"


def test_split_by_conversation_has_no_overlap():
  prompts = data.read_prompts("taskmaster4_dialogs", DIALOGS, skip_invalid=True)
  train, held_out = data.split_by_group(prompts, 0.2, seed=3)
  assert len(train) + len(held_out) == len(prompts) and held_out
  assert not {p["group"] for p in train} & {p["group"] for p in held_out}
  ds = data.read_dialogs("taskmaster4_dialogs", DIALOGS, skip_invalid=True)
  d_train, d_held = data.split_by_group(ds, 0.2, seed=3)  # SFT and RL splits agree
  assert {p["group"] for p in held_out} <= {d["group"] for d in d_held}
  assert not {p["group"] for p in held_out} & {d["group"] for d in d_train}


def test_encoded_prompts_are_left_padded_and_end_with_generation_prefix(tok, tmp_path):
  prompts = data.read_prompts("taskmaster4_dialogs", head_lines(DIALOGS, tmp_path / "d.jsonl", 2))
  header = tok(HEADER, add_special_tokens=False)["input_ids"]
  arrays, num_truncated = data.encode_prompts(prompts, tok, 1024)
  assert num_truncated == 0
  for row, p in enumerate(prompts):
    ids, attn = arrays["input_ids"][row], arrays["attention_mask"][row]
    n = attn.sum()
    assert attn[-n:].all() and not attn[:-n].any()
    assert list(ids[-len(header):]) == header
    assert tok.decode(ids[-n:]) == tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=False)
  cut, num_truncated = data.encode_prompts(prompts, tok, 24)
  longer = int((arrays["attention_mask"].sum(1) > 24).sum())
  assert num_truncated == longer > 0
  np.testing.assert_array_equal(cut["input_ids"], arrays["input_ids"][:, -24:])


def test_empty_prompt_set_names_the_file(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("\n")
  with pytest.raises(data.DataError, match=f"^{path}: no prompts$"):
    data.read_prompts("taskmaster4", path)
  with pytest.raises(data.DataError, match=f"^{path}: no dialogs$"):
    data.read_dialogs("taskmaster4_dialogs", path)


def test_rl_prompts_are_exactly_the_sft_contexts(tok, plain_tok):
  """The tokens before each SFT target are the encoded RL prompt that ends before that turn: the policy is trained
  on exactly the contexts it will generate from."""
  for t in (tok, plain_tok):
    d = _dialog_sample()[0]
    arrays, _ = data.encode_sft([d], t, 1024)
    ids, mask = arrays["input_ids"][0], arrays["loss_mask"][0]
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    prompts = dialogs.dialog_prompts(d)
    assert len(starts) == len(prompts) > 1
    encoded, _ = data.encode_prompts(prompts, t, 1024)
    for row, s in enumerate(starts):
      n = encoded["attention_mask"][row].sum()
      if t is tok:
        assert n == s and list(encoded["input_ids"][row, -n:]) == list(ids[:s])
      else:  # plain format: RL prompts render earlier assistant turns without their eos
        want = [x for i, x in enumerate(ids[:s]) if not (x == t.eos_token_id and mask[i])]
        assert list(encoded["input_ids"][row, -n:]) == want


def test_dev_prompts_are_the_training_split_the_run_did_not_train_on(tmp_path):
  """eval_policy --split dev: the training split's prompts after the first data.max_train_prompts; none held out,
  none trained on; a run that trained on every prompt has no dev split (one-line error)."""
  import ml_collections
  from perl_jax.rl import evaluate
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"question {i}", "group": f"g{i % 7}"}) + "\n" for i in range(40)))
  config = ml_collections.ConfigDict(dict(data=dict(eval_fraction=0.3, seed=0, max_train_prompts=5)))
  train = evaluate.held_out_prompts(config, "prompt", path, "train")
  held = evaluate.held_out_prompts(config, "prompt", path, "eval")
  dev = evaluate.held_out_prompts(config, "prompt", path, "dev")
  assert dev == train[5:] and len(dev) > 0
  texts = lambda ps: {p["prompt"][0]["content"] for p in ps}
  assert not texts(dev) & texts(held) and not texts(dev) & texts(train[:5])
  config.data.max_train_prompts = 0
  with pytest.raises(data.DataError, match="no dev prompts"):
    evaluate.held_out_prompts(config, "prompt", path, "dev")


def test_only_stop_strings_other_than_eos_need_the_host(tok):
  """The default stop string "<|im_end|>" is SmolLM2's EOS token: the sampler ends rows there on device, so RL
  cuts nothing on the host (which would pull every sample to one process); other stop strings stay, and also end
  rows on device as their token ids."""
  import ml_collections
  from perl_jax.rl import setup
  config = ml_collections.ConfigDict(dict(rl=dict(stop_strings=["<|im_end|>", "\nUser:"])))
  assert tok.decode([tok.eos_token_id]) == "<|im_end|>"
  assert setup.host_stop_strings(config, tok, tok.eos_token_id) == ("\nUser:",)
  assert setup.host_stop_strings(config, tok, -1) == ("<|im_end|>", "\nUser:")
  # On device: each other stop string as its own tokenization, which decodes back to it.
  seqs = setup.stop_sequences(config, tok, tok.eos_token_id)
  assert len(seqs) == 1 and tok.decode(list(seqs[0])) == "\nUser:"
  assert seqs[0] == tuple(tok("\nUser:", add_special_tokens=False)["input_ids"])
