"""Linear probe of the frozen backbone: does the RM's input representation already hold the label?

  python scripts/probe_features.py --config experiments/rm/smollm2.py:tm4_lora --config.data.dev_fraction=0.15 \
      --config.data.max_len=192
  python scripts/probe_features.py --config experiments/rm/smollm2.py:tm4_lora --split_seeds 10
One forward of the frozen base (no adapters) over the config's train and eval examples (its dev split with
data.dev_fraction > 0); features = the final hidden state at the last token (what the RM head reads) and the
mean over response tokens; a logistic regression (scikit-learn, an extra; C picked by 5-fold CV on the train
part) is fit on train and scored on eval. Prints one JSON object: eval ROC-AUC (binary) or pair accuracy (pairs)
per feature. A probe near chance says the signal is not linearly readable from the frozen model, so the adapters
must create it; a probe well above chance says the head and optimisation are the bottleneck.

--split_seeds N: one forward over every example of data.path, then, on the held-out split of each seed 0..N-1
(grouped by dialog, as the RM configs split), the last-token probe and the bag-of-words baseline
(perl_jax.analysis.bow_baseline, settings by CV) are fit on its train part and scored on it: one JSON row per
seed, then the means, stds and the mean paired difference.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from perl_jax import reward, trained
from perl_jax.analysis import feature_probe

_CONFIG = config_flags.DEFINE_config_file("config", None, "An RM config (experiments/rm/*.py:ARG).")
_SPLIT_SEEDS = flags.DEFINE_integer("split_seeds", 0, "> 0: probe vs bag-of-words on the held-out splits of seeds "
                                    "0..N-1 (one forward over all examples).")


def main(_):
  config = _CONFIG.value
  model_cfg, base, tokenizer = trained.reward_backbone(config, None)  # The base, or the SFT model of init_from.
  if _SPLIT_SEEDS.value > 0:
    return feature_probe.across_splits(config, model_cfg, base, tokenizer, _SPLIT_SEEDS.value)
  train, held, info = reward.load_data(config, tokenizer)
  f_tr, f_ev = feature_probe.features(model_cfg, base, train), feature_probe.features(model_cfg, base, held)
  result = {"eval_split": info["eval_split"], "train_examples": info["train_examples"],
            "eval_examples": info["eval_examples"], "max_len": config.data.max_len}
  pairwise = train["input_ids"].ndim == 3
  for i, name in enumerate(("last_token", "response_mean")):
    result[name] = feature_probe.probe_metrics(f_tr[..., i, :], train.get("label"), f_ev[..., i, :],
                                               held.get("label"), pairwise)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
