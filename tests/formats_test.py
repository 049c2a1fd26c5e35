"""The generic (TRL-style) formats: every form reads to the same records as hand-built ones, from JSON lines,
Parquet and Arrow alike; bad records are one-line errors naming file, row and field; every stage's reader
(RM examples, SFT dialogs, RL prompts) takes them."""
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perl_jax import data
from perl_jax.data import files, generic

USER = {"role": "user", "content": "How do I brew tea?"}
SYSTEM = {"role": "system", "content": "Be brief."}
GOOD, BAD = "Steep it for three minutes.", "Boil it for an hour."
EXPECTED = {"prompt": [USER], "chosen": GOOD, "rejected": BAD}

PREFERENCE_FORMS = {
    "standard": {"prompt": USER["content"], "chosen": GOOD, "rejected": BAD},
    "conversational": {"prompt": [USER], "chosen": [{"role": "assistant", "content": GOOD}],
                       "rejected": [{"role": "assistant", "content": BAD}]},
    "implicit_prompt": {"chosen": [USER, {"role": "assistant", "content": GOOD}],
                        "rejected": [USER, {"role": "assistant", "content": BAD}]},
}


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def write_table(path, records):
  """Parquet as datasets' to_parquet writes it, or Arrow as its save_to_disk shards (an IPC stream)."""
  table = pa.Table.from_pylist(records)
  if path.suffix == ".parquet":
    pq.write_table(table, path)
  else:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
  return path


@pytest.mark.parametrize("form", sorted(PREFERENCE_FORMS))
def test_preference_forms_read_to_the_same_pair(tmp_path, form):
  path = write_jsonl(tmp_path / "p.jsonl", [PREFERENCE_FORMS[form]])
  assert data.read_examples("preference", path) == [EXPECTED]
  assert data.KINDS["preference"] == "pairwise"


def test_system_message_and_multi_turn_implicit_prompt(tmp_path):
  turns = [SYSTEM, USER, {"role": "assistant", "content": "Green or black?"}, {"role": "user", "content": "Black."}]
  record = {"chosen": turns + [{"role": "assistant", "content": GOOD}],
            "rejected": turns + [{"role": "assistant", "content": BAD}]}
  [ex] = data.read_examples("preference", write_jsonl(tmp_path / "p.jsonl", [record]))
  assert ex == {"prompt": turns, "chosen": GOOD, "rejected": BAD}


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_tables_read_like_jsonl(tmp_path, suffix):
  """Parquet / Arrow rows (nested message lists included) equal the JSON lines' records, in order; a folder of
  shards reads as their concatenation."""
  records = [{"prompt": [USER], "chosen": [{"role": "assistant", "content": f"{GOOD} {i}"}],
              "rejected": [{"role": "assistant", "content": BAD}]} for i in range(5)]
  want = data.read_examples("preference", write_jsonl(tmp_path / "p.jsonl", records))
  assert data.read_examples("preference", write_table(tmp_path / f"p{suffix}", records)) == want
  shards = tmp_path / "shards"
  shards.mkdir()
  write_table(shards / f"data-00000-of-00002{suffix}", records[:2])
  write_table(shards / f"data-00001-of-00002{suffix}", records[2:])
  assert data.read_examples("preference", shards) == want


def test_table_row_errors_name_the_row(tmp_path):
  records = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": "b"}]
  path = write_table(tmp_path / "p.parquet", records)
  with pytest.raises(data.DataError, match=r"p\.parquet:2: field 'rejected': identical to 'chosen'"):
    data.read_examples("preference", path)


def test_unpaired_preference_labels(tmp_path):
  rows = [{"prompt": USER["content"], "completion": GOOD, "label": True},
          {"prompt": [USER], "completion": [{"role": "assistant", "content": BAD}], "label": 0}]
  exs = data.read_examples("unpaired_preference", write_jsonl(tmp_path / "u.jsonl", rows))
  assert exs == [{"prompt": [USER], "response": GOOD, "label": 1.0}, {"prompt": [USER], "response": BAD, "label": 0.0}]
  assert data.KINDS["unpaired_preference"] == "binary"


BAD_RECORDS = [
    ("preference", {"prompt": [USER, {"role": "tool", "content": "x"}], "chosen": GOOD, "rejected": BAD},
     "prompt[1].role", "must be one of system, user, assistant"),
    ("preference", {"prompt": [USER, {"role": "assistant", "content": "x"}], "chosen": GOOD, "rejected": BAD},
     "prompt", "ends with an assistant message"),
    ("preference", {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, USER], "rejected": BAD},
     "chosen", "expected one assistant message"),
    ("preference", {"chosen": GOOD, "rejected": BAD}, "prompt", "missing"),
    ("preference", {"prompt": "q", "chosen": GOOD}, "rejected", "missing"),
    ("preference", {"prompt": [{"role": "system", "content": "s"}], "chosen": GOOD, "rejected": BAD},
     "prompt", "no user message"),
    ("unpaired_preference", {"prompt": "q", "completion": GOOD, "label": 2}, "label", "must be true/false or 1/0"),
    ("unpaired_preference", {"prompt": "q", "completion": GOOD, "label": "yes"}, "label", "must be true/false"),
    ("messages", {"messages": [USER]}, "messages", "no assistant message after a user message"),
    ("prompt", {"prompt": 3}, "prompt", "expected a string or a non-empty list"),
    ("prompt", {"prompt": "q", "group": [1]}, "group", "expected a string or an integer"),
]


@pytest.mark.parametrize("fmt,record,field,problem", BAD_RECORDS)
def test_bad_record_is_one_line_naming_file_line_field(tmp_path, fmt, record, field, problem):
  good = {"preference": PREFERENCE_FORMS["standard"], "unpaired_preference": {"prompt": "q", "completion": GOOD,
                                                                              "label": 1},
          "messages": {"messages": [USER, {"role": "assistant", "content": GOOD}]}, "prompt": {"prompt": "q"}}[fmt]
  path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
  read = {"preference": data.read_examples, "unpaired_preference": data.read_examples,
          "messages": data.read_dialogs, "prompt": data.read_prompts}[fmt]
  with pytest.raises(data.DataError) as e:
    read(fmt, path)
  assert str(e.value).startswith(f"{path}:2: field '{field}': {problem}")
  assert "\n" not in str(e.value)


def test_every_stage_reads_the_generic_formats(tmp_path):
  """SFT dialogs from messages and from preference pairs (prompt + chosen); RL prompts from prompt, messages
  (each prefix before an assistant turn) and preference records."""
  reply = {"role": "assistant", "content": GOOD}
  dialog = [SYSTEM, USER, reply, {"role": "user", "content": "And coffee?"}, {"role": "assistant", "content": "X"}]
  msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": dialog, "group": 7}])
  assert data.read_dialogs("messages", msgs) == [{"messages": dialog, "group": "7"}]
  pref = write_jsonl(tmp_path / "p.jsonl", [PREFERENCE_FORMS["standard"]])
  assert data.read_dialogs("preference", pref) == [{"messages": [USER, reply], "group": USER["content"]}]
  unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "yes", "label": 1},
                                                {"prompt": "r", "completion": "no", "label": 0}])
  assert [d["messages"][-1]["content"] for d in data.read_dialogs("unpaired_preference", unpaired)] == ["yes"]
  prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "q1"}, {"prompt": [SYSTEM, USER], "group": "g"}])
  assert data.read_prompts("prompt", prompts) == [{"prompt": [{"role": "user", "content": "q1"}], "group": "q1"},
                                                  {"prompt": [SYSTEM, USER], "group": "g"}]
  assert [p["prompt"] for p in data.read_prompts("messages", msgs)] == [dialog[:2], dialog[:4]]
  assert data.read_prompts("preference", pref) == [{"prompt": [USER], "group": USER["content"]}]


def test_group_keeps_records_on_one_side_of_the_split(tmp_path):
  rows = [{"prompt": f"question {i}", "chosen": "a", "rejected": "b", "group": f"conv{i % 3}"} for i in range(60)]
  exs = data.read_examples("preference", write_jsonl(tmp_path / "p.jsonl", rows))
  train, held = data.split_train_eval(exs, 0.5, seed=0)
  assert {e["group"] for e in train}.isdisjoint({e["group"] for e in held})
  assert len(train) + len(held) == 60


def test_unknown_format_names_the_choices(tmp_path):
  path = write_jsonl(tmp_path / "p.jsonl", [PREFERENCE_FORMS["standard"]])
  for read, kind in ((data.read_examples, "preference"), (data.read_dialogs, "dialog"), (data.read_prompts, "prompt")):
    with pytest.raises(data.DataError, match=f"field 'format': unknown {kind} format 'trl'.*'preference'"):
      read("trl", path)


def test_skipped_records_are_one_summary_line(tmp_path, caplog):
  rows = [PREFERENCE_FORMS["standard"]] + [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 5
  path = write_jsonl(tmp_path / "p.jsonl", rows)
  with caplog.at_level(logging.WARNING):
    prompts = data.read_prompts("preference", path, skip_invalid=True)
  assert len(prompts) == 1
  [line] = [r.getMessage() for r in caplog.records]
  assert "skipped 5 invalid records" in line and f"{path}:2: field 'rejected'" in line


def test_files_rows_number_lines_and_rows(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"a": 1}\n\n{"a": 2}\n')
  assert list(files.iter_rows(path)) == [(1, '{"a": 1}\n'), (3, '{"a": 2}\n')]
  assert generic.ROLES == ("system", "user", "assistant")


def test_readme_preference_lines_read(tmp_path):
  """The README's hand-written preference lines are valid records, one per form."""
  from tests.conftest import ROOT
  text = (ROOT / "README.md").read_text()
  block = text.split("## Your own model and data", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
  exs = data.read_examples("preference", write_jsonl(tmp_path / "readme.jsonl",
                                                      [json.loads(line) for line in block.splitlines()]))
  assert len(exs) == 3 and all(e["prompt"][-1]["role"] == "user" for e in exs)


def test_the_paper_formats_feed_every_stage():
  """TL;DR and SHP pairs (fixtures): SFT dialogs end in the chosen reply, RL prompts are the examples' prompts."""
  from tests.conftest import ROOT
  for fmt, name in (("tldr", "tldr_comparisons.jsonl"), ("shp", "shp.jsonl")):
    path = ROOT / "tests" / "fixtures" / name
    examples = data.read_examples(fmt, path)
    dialogs = data.read_dialogs(fmt, path)
    assert [d["messages"] for d in dialogs] == [e["prompt"] + [{"role": "assistant", "content": e["chosen"]}]
                                                for e in examples]
    prompts = data.read_prompts(fmt, path)
    assert [p["prompt"] for p in prompts] == [e["prompt"] for e in examples]
