"""TFDS builders: build from a manual dir into array_record without TensorFlow, read back = reader."""
import gzip
import json
import pathlib

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from perl_jax import data  # pylint: disable=g-import-not-at-top
from perl_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = {
    "hh_rlhf": ROOT / "experiments/data/hh-rlhf-harmless/pairs.jsonl.gz",
    "taskmaster4": ROOT / "experiments/data/taskmaster4/reward.jsonl.gz",
    "tldr": ROOT / "tests/fixtures/tldr_comparisons.jsonl",
    "shp": ROOT / "tests/fixtures/shp.jsonl",
}


def head_lines(path, n):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [line for _, line in zip(range(n), f)]


def build(fmt, manual_dir, data_dir, config="strict"):
  builder = tfds_builders.BUILDERS[fmt](data_dir=str(data_dir), config=config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def canonical(examples):
  return sorted(json.dumps(e, sort_keys=True) for e in examples)


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_build_and_read_back_equals_reader(tmp_path, fmt):
  manual = tmp_path / "manual"
  (manual / "sub").mkdir(parents=True)
  lines = head_lines(SOURCES[fmt], 12)
  (manual / "sub" / "train.jsonl").write_text("".join(lines[:-2]))
  (manual / "test.jsonl").write_text("".join(lines[-2:]))
  builder = build(fmt, manual, tmp_path / "data")
  assert builder.info.file_format.value == "array_record"
  sources = builder.as_data_source()
  assert sorted(sources) == ["test", "train"]
  for split, path in (("train", manual / "sub" / "train.jsonl"), ("test", manual / "test.jsonl")):
    got = [tfds_builders.decode_example(x) for x in sources[split]]
    assert canonical(got) == canonical(data.READERS[fmt](path))
  reopened = tfds.data_source(builder.name, data_dir=str(tmp_path / "data"), split="test")
  assert len(reopened) == 2


def test_strict_config_fails_with_reader_error_skip_invalid_config_builds(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  good = {"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}
  path = manual / "shp.jsonl"
  path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, labels=5)) + "\n")
  with pytest.raises(data.DataError, match=f"^{path}:2: field 'labels': must be 0 or 1, got 5$"):
    build("shp", manual, tmp_path / "data")
  builder = build("shp", manual, tmp_path / "data", config="skip_invalid")
  assert [tfds_builders.decode_example(x) for x in builder.as_data_source()["train"]] == [
      {"prompt": [{"role": "user", "content": "h"}], "chosen": "a", "rejected": "b"}]


def test_find_split_files(tmp_path):
  for rel in ("askscience/train.json", "askscience/validation.json", "other/test.jsonl.gz", "extra.jsonl", "x.txt"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("")
  splits = tfds_builders.find_split_files(tmp_path)
  assert {k: [pathlib.Path(p).relative_to(tmp_path).as_posix() for p in v] for k, v in splits.items()} == {
      "test": ["other/test.jsonl.gz"], "train": ["askscience/train.json", "extra.jsonl"],
      "validation": ["askscience/validation.json"]}
