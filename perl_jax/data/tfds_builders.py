"""TFDS builders for the preference formats, built from files placed in the manual dir.

They work without TensorFlow when written as array_record (the default here) and read with
builder.as_data_source() or tfds.data_source(); tfds.load / as_dataset need TensorFlow.

  builder = PerlHhRlhf(data_dir=..., config="skip_invalid")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))
  examples = [decode_example(x) for x in builder.as_data_source()["train"]]
"""
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from perl_jax.data import readers

_SPLITS = ("train", "validation", "test")
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def _manual(what: str) -> str:
  """MANUAL_DOWNLOAD_INSTRUCTIONS for files of `what` (a dataset and its fields)."""
  return (f"Put the {what} JSON-lines files ({', '.join(_SUFFIXES)}) anywhere under the manual dir.\n"
          "Files named train / validation / test form those splits; every other file goes to 'train'.")


def _messages_feature():
  return tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})


def _pairwise_features():
  return tfds.features.FeaturesDict({
      "prompt": _messages_feature(), "chosen": tfds.features.Text(), "rejected": tfds.features.Text()})


def _binary_features():
  return tfds.features.FeaturesDict({
      "prompt": _messages_feature(), "response": tfds.features.Text(), "label": np.float32})


def find_split_files(manual_dir) -> dict[str, list[str]]:
  """{split: sorted files}: a file's name picks its split (train/validation/test), else 'train'."""
  splits = {}
  for root, _, names in os.walk(os.fspath(manual_dir)):
    for name in names:
      suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
      if suffix is None:
        continue
      stem = name[:-len(suffix)]
      splits.setdefault(stem if stem in _SPLITS else "train", []).append(os.path.join(root, name))
  return {split: sorted(files) for split, files in sorted(splits.items())}


def decode_example(example: dict) -> dict:
  """A TFDS data-source record (bytes, columnar prompt) -> the reader's dict form."""
  out = {}
  for key, value in example.items():
    if key == "prompt":
      roles, contents = value["role"], value["content"]
      out[key] = [{"role": _text(r), "content": _text(c)} for r, c in zip(roles, contents)]
    elif key == "label":
      out[key] = float(value)
    else:
      out[key] = _text(value)
  return out


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body: one split per file group, examples straight from a perl_jax reader."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="strict", description="Any invalid record fails the build."),
      tfds.core.BuilderConfig(name="skip_invalid", description="Invalid records are logged and left out."),
  ]
  FORMAT = ""
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""
  # tfds' own code_path needs `importlib_resources` (declared only for Python < 3.9).
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format="array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self):
    features = _binary_features() if readers.KINDS[self.FORMAT] == "binary" else _pairwise_features()
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=features,
                                 homepage=self.HOMEPAGE, citation=self.CITATION)

  def _split_generators(self, dl_manager):
    splits = find_split_files(dl_manager.manual_dir)
    if not splits:
      raise FileNotFoundError(f"{dl_manager.manual_dir}: no {'/'.join(_SUFFIXES)} files\n"
                              + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {split: self._generate_examples(files, dl_manager.manual_dir) for split, files in splits.items()}

  def _generate_examples(self, files, manual_dir):
    read = readers.READERS[self.FORMAT]
    skip_invalid = self.builder_config.name == "skip_invalid"
    for path in files:
      rel = os.path.relpath(path, manual_dir)
      for i, example in enumerate(read(path, skip_invalid=skip_invalid)):
        yield f"{rel}:{i}", example


class PerlHhRlhf(_PreferenceBuilder):
  """Anthropic HH-RLHF pairwise preferences (e.g. harmless-base/{train,test}.jsonl.gz)."""

  FORMAT = "hh_rlhf"
  DESCRIPTION = "Anthropic HH-RLHF: a shared dialog prompt with a chosen and a rejected final reply."
  HOMEPAGE = "https://github.com/anthropics/hh-rlhf"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _manual("HH-RLHF {chosen, rejected}")


class PerlTaskmaster4Reward(_PreferenceBuilder):
  """PERL's Taskmaster-4 thumbs-up/down reward data (TM-4-2024/reward)."""

  FORMAT = "taskmaster4"
  DESCRIPTION = "Taskmaster-4 coffee-ordering agent turns with binary human rewards (PERL, 2024)."
  HOMEPAGE = "https://github.com/google-research-datasets/Taskmaster"
  CITATION = "Sidahmed et al., PERL: Parameter Efficient Reinforcement Learning from Human Feedback, 2024."
  MANUAL_DOWNLOAD_INSTRUCTIONS = _manual("Taskmaster-4 reward {context, generation, reward}")


class PerlTldrComparisons(_PreferenceBuilder):
  """OpenAI summarize-from-feedback comparisons (comparisons/batch*.json)."""

  FORMAT = "tldr"
  DESCRIPTION = "Reddit TL;DR summary comparisons: a post prompt with a preferred and a worse summary."
  HOMEPAGE = "https://github.com/openai/summarize-from-feedback"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _manual("summarize-from-feedback {info, summaries, choice}")


class PerlShp(_PreferenceBuilder):
  """Stanford Human Preferences (one folder per domain, {train,validation,test}.json)."""

  FORMAT = "shp"
  DESCRIPTION = "Stanford SHP: a Reddit post with two human comments, one preferred by votes."
  HOMEPAGE = "https://huggingface.co/datasets/stanfordnlp/SHP"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _manual("SHP {history, human_ref_A, human_ref_B, labels}")


BUILDERS = {cls.FORMAT: cls for cls in (PerlHhRlhf, PerlTaskmaster4Reward, PerlTldrComparisons, PerlShp)}
