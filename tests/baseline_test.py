"""scripts/baseline_bow.py: TF-IDF + logistic regression on a slice of the shipped data, eval_reward's keys, and
metrics equal to perl_jax.stats on its scores (ROC-AUC checked independently with scikit-learn)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from perl_jax import data, stats
from perl_jax.analysis import bow_baseline
from tests.conftest import ROOT
from tests.helpers import head_lines

TM4 = ROOT / "experiments/data/taskmaster4/reward.jsonl.gz"
HH = ROOT / "experiments/data/hh-rlhf-harmless/pairs.jsonl.gz"
BINARY_KEYS = {"accuracy", "balanced_accuracy", "roc_auc", "positive_rate", "loss", "num_examples", "num_truncated"}
PAIRWISE_KEYS = {"accuracy", "mean_margin", "loss", "num_examples", "num_truncated"}


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "scripts/baseline_bow.py", *map(str, args)], cwd=ROOT, capture_output=True,
                        text=True, env=env or dict(os.environ), timeout=300)


@pytest.mark.parametrize("fmt,src,n,keys", [("taskmaster4", TM4, 200, BINARY_KEYS), ("hh_rlhf", HH, 150, PAIRWISE_KEYS)])
def test_baseline_cli_prints_eval_reward_keys(tmp_path, fmt, src, n, keys):
  pytest.importorskip("sklearn")
  train, held = head_lines(src, tmp_path / "train.jsonl", n), head_lines(src, tmp_path / "eval.jsonl", 60, start=n)
  result = _cli("--data", train, "--eval", held, "--format", fmt, "--skip_invalid")
  assert result.returncode == 0, result.stderr
  row = json.loads(result.stdout)
  assert keys <= set(row) and row["format"] == fmt and row["baseline"] == "tfidf_logreg"
  # The same pipeline in-process gives the same figures, and they are evaluation's metrics of its scores.
  train_ex = data.read_examples(fmt, train, skip_invalid=True)
  eval_ex = data.read_examples(fmt, held, skip_invalid=True)
  assert row["num_examples"] == len(eval_ex)
  model = bow_baseline.fit(data.KINDS[fmt], train_ex, bow_baseline.Settings(**row["settings"]))
  scores = model.scores(eval_ex)
  if fmt == "taskmaster4":
    labels = np.array([e["label"] for e in eval_ex]) > 0.5
    expected = stats.binary_metrics(scores, labels)
    from sklearn.metrics import roc_auc_score
    assert row["roc_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert row["accuracy"] == pytest.approx(np.mean((scores > 0) == labels))
  else:
    expected = stats.pairwise_metrics(scores[:, 0], scores[:, 1])
    assert row["accuracy"] == pytest.approx(np.mean(scores[:, 0] > scores[:, 1]))
  for key, value in expected.items():
    assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_baseline_folds_stay_inside_train():
  ex = data.read_examples("taskmaster4", TM4)[:300]
  fold = bow_baseline.folds(ex)
  assert set(fold) == set(range(bow_baseline.FOLDS))
  by_key = {}
  for e, f in zip(ex, fold):
    by_key.setdefault(data.pipeline.first_user_turn(e), set()).add(f)
  assert all(len(v) == 1 for v in by_key.values())


def test_baseline_without_sklearn_is_one_line(tmp_path):
  blocker = tmp_path / "sklearn"
  blocker.mkdir()
  (blocker / "__init__.py").write_text("raise ImportError('no sklearn here')\n")
  env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  result = _cli("--data", TM4, "--format", "taskmaster4", env=env)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f"error: {bow_baseline.SKLEARN_ERROR}"]


def _leaky_dialogs(n_dialogs=60, turns=5, seed=0):
  """Binary examples whose label is fixed per dialog and readable only from a dialog-specific word: a model can
  score a held-out turn only by having seen turns of the same dialog in training."""
  rng = np.random.default_rng(seed)
  common = "can i get a coffee please thanks".split()
  examples = []
  for d in range(n_dialogs):
    label = float(d % 2)
    for t in range(turns):
      words = [f"dialog{d}word"] + list(rng.choice(common, 4))
      examples.append({"prompt": [{"role": "user", "content": f"open {d}"}, {"role": "assistant", "content": str(t)}],
                       "response": " ".join(words), "label": label})
  return examples


def test_baseline_split_by_example_leaks_dialogs_and_by_group_does_not(monkeypatch):
  pytest.importorskip("sklearn")
  # One grid point (word unigrams of the reply, weak L2) for speed: this test is about the split, not the search.
  monkeypatch.setattr(bow_baseline, "grid", lambda kind: [bow_baseline.Settings("response", 1, 16.0)])
  ex = _leaky_dialogs()
  for by in ("group", "example"):
    train, held = bow_baseline.split(ex, 0.2, seed=3, by=by)
    assert len(train) + len(held) == len(ex) and held
    shared = {data.pipeline.first_user_turn(e) for e in train} & {data.pipeline.first_user_turn(e) for e in held}
    assert (len(shared) == 0) == (by == "group"), by
  rows, summary = bow_baseline.across_splits("taskmaster4", ex, 0.2, range(3), by="example")
  assert [r["split_seed"] for r in rows] == [0, 1, 2] and summary["split_seeds"] == [0, 1, 2]
  assert summary["roc_auc_mean"] == pytest.approx(np.mean([r["roc_auc"] for r in rows]))
  assert summary["roc_auc_std"] == pytest.approx(np.std([r["roc_auc"] for r in rows]))
  assert summary["roc_auc_mean"] > 0.95  # The dialog word was seen in training: the leak scores near 1.
  _, grouped = bow_baseline.across_splits("taskmaster4", ex, 0.2, range(3), by="group")
  assert grouped["roc_auc_mean"] < 0.65  # Unseen dialogs: the common words carry nothing, so about chance.


def test_baseline_as_seen_keeps_what_the_rm_reads():
  from perl_jax import models
  tok = models.load_tokenizer(models.default_model_path())
  tm4 = data.read_examples("taskmaster4", TM4)[:30]
  whole, cut = (bow_baseline.as_seen("taskmaster4", tm4, tok, n) for n in (4096, 128))
  for e, w, c in zip(tm4, whole, cut):
    assert w["response"].removesuffix(tok.eos_token) == e["response"]  # Untruncated: the reply, then eos.
    assert all(m["content"] in w["prompt_seen"] for m in e["prompt"])
    assert w["prompt_seen"].endswith(c["prompt_seen"])  # Cut from the left ...
    n_seen = len(tok(c["prompt_seen"] + c["response"], add_special_tokens=False)["input_ids"])
    assert n_seen <= 128 + 2  # ... to at most max_len tokens (re-tokenising may merge or split at the cut).
    assert c["prompt"] == e["prompt"]  # Splits key on the original turns.
  assert sum(len(c["prompt_seen"]) < len(w["prompt_seen"]) for w, c in zip(whole, cut)) > 10
  hh = data.read_examples("hh_rlhf", HH, skip_invalid=True)[:20]
  for e, w in zip(hh, bow_baseline.as_seen("hh_rlhf", hh, tok, 4096)):
    assert (w["chosen"].removesuffix(tok.eos_token), w["rejected"].removesuffix(tok.eos_token)) == (
        e["chosen"], e["rejected"])


def test_probe_features_across_splits_pairs_each_row_with_its_example(tmp_path, monkeypatch, capsys):
  """scripts/probe_features.py --split_seeds: the probe is fit and scored on the rows of each split's own examples.
  Features stubbed to carry each row's label exactly, so a misaligned row index shows as a probe below 1."""
  pytest.importorskip("sklearn")
  from experiments.rm import smollm2
  from perl_jax import models
  from perl_jax.analysis import feature_probe as probe
  rng = np.random.default_rng(0)
  monkeypatch.setattr(probe, "features", lambda cfg, base, arrays: np.stack(
      [arrays["label"][:, None] + 0.01 * rng.normal(size=(len(arrays["label"]), 2))] * 2, axis=1))
  full_grid = bow_baseline.grid
  monkeypatch.setattr(bow_baseline, "grid", lambda kind: full_grid(kind)[:2])  # 2 of its 16 points, for speed
  config = smollm2.get_config("tm4_lora")
  config.data.path = str(head_lines(TM4, tmp_path / "tm4.jsonl", 400))
  probe.across_splits(config, None, None, models.load_tokenizer(models.default_model_path()), 2)
  *rows, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["split_seed"] for r in rows] == [0, 1]
  ex = data.read_examples("taskmaster4", config.data.path)
  for r in rows:
    train, held = bow_baseline.split(ex, config.data.eval_fraction, r["split_seed"])
    assert r["eval_examples"] == len(held) and r["probe_roc_auc"] == 1.0
    bow = bow_baseline.run("taskmaster4", train, held)
    assert r["bow_roc_auc"] == pytest.approx(bow["roc_auc"])
  assert summary["probe_minus_bow_mean"] == pytest.approx(np.mean([1.0 - r["bow_roc_auc"] for r in rows]))
