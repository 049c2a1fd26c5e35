"""Export a trained reward model (a train_reward workdir) or RL policy (a train_rl workdir) for transformers / PEFT.

  python scripts/export.py --workdir runs/tm4 --out exported/tm4 --format merged|peft [--step N]
merged: a self-contained AutoModelForSequenceClassification folder (LoRA merged, tokenizer included).
peft:   a LoRA adapter folder for PeftModel.from_pretrained(AutoModelForSequenceClassification(base), OUT); its
        adapter_config.json names the base by Hub id (--base_model overrides), so AutoPeftModelFor* finds it, and
        perl_export.json records the base file and its quantization (a GGUF's, e.g. Q4_1: training saw those
        weights dequantized).
transformers' score layer has no bias: add config.json "perl_reward_bias" (merged) or perl_reward.json
"bias" (peft) to its logits to get this codebase's rewards.
An RL run (its run.json has an `rl` field) exports its policy: merged = a *ForCausalLM folder (SFT and policy
adapters merged), peft = one CAUSAL_LM adapter for the base model standing for both adapters.
"""
import logging

from absl import flags

from perl_jax import cli, runs, trained
from perl_jax.export import policy as export_policy, reward as export_reward

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder written by train_reward (run.json, checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output folder (created).")
_FORMAT = flags.DEFINE_enum("format", "merged", ["merged", "peft"], "merged HF model or PEFT adapter.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step. Default: the latest.")
_MODEL_PATH = flags.DEFINE_string("model_path", None, "Base model, if it moved since training.")
_BASE_MODEL = flags.DEFINE_string("base_model", "", "The Hub id a PEFT adapter names as its base. Default: the id the "
                                  "run's base model is known by (its Hub id, the embedded SmolLM2's, a GGUF's or HF "
                                  "cache folder's); never a local path.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weight dtype of a merged export.")
flags.mark_flags_as_required(["workdir", "out"])


def main(_):
  cli.run_or_exit(_export)


def _export():
  if "rl" in runs.read_config(_WORKDIR.value):
    return _export_policy()
  rm = trained.restore_reward(_WORKDIR.value, step=_STEP.value, model_path=_MODEL_PATH.value)
  if _FORMAT.value == "merged":
    out = export_reward.export_merged(rm, _OUT.value, _DTYPE.value)
  else:
    out = export_reward.export_peft(rm, _OUT.value, _BASE_MODEL.value)
  logging.getLogger("perl_jax").info("step %d exported to %s (%s); head bias %.6g", rm.step, out, _FORMAT.value,
                                     trained.head_bias(rm))


def _export_policy():
  from perl_jax.rl import setup
  policy = setup.restore(_WORKDIR.value, step=_STEP.value)
  model_path = runs.model_path(policy.config.model)
  if _FORMAT.value == "merged":
    out = export_policy.export_merged(policy, _OUT.value, model_path, _DTYPE.value)
  else:
    out = export_policy.export_peft(policy, _OUT.value, model_path, _BASE_MODEL.value)
  logging.getLogger("perl_jax").info("RL policy step %d exported to %s (%s)", policy.step, out, _FORMAT.value)


if __name__ == "__main__":
  cli.app_run(main)
