"""A trained RL policy (`setup.restore`, a `runs.Trained`) on held-out prompts: RM reward of the policy and of
its SFT anchor with the paired difference and its 95% bootstrap interval, the win rate of the policy over the
anchor with its 95% Wilson interval, KL to the anchor, finished fractions and lengths (and the same under an
optional second "judge" RM the policy never trained against, to show over-optimisation). n samples per prompt
pair sample j of the policy with sample j of the anchor (same RNG); intervals resample prompts, keeping a prompt's
samples together.

The anchor is the policy's own stack without the policy LoRA (LoRA mode: the policy LoRA zeroed, which is
exactly the reference role) or the frozen reference copy (full mode); both sample with the run's settings.
"""
import dataclasses
import json
import logging
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from perl_jax import data, models, runs, sharding, stats, trained
from perl_jax.rl import RLConfig, roles, rollout, setup

log = logging.getLogger("perl_jax")


def anchor_trainable(rlcfg: RLConfig, trainable: dict, frozen: dict) -> dict:
  """The trainable tree with the policy replaced by the SFT anchor: a zero policy LoRA, or the reference copy."""
  if rlcfg.mode == "lora":
    return {**trainable, "policy": jax.tree.map(jnp.zeros_like, trainable["policy"])}
  return {**trainable, "policy": frozen["reference"]}


def win_rate(r_policy_N, r_anchor_N) -> float:
  """P(r_policy > r_anchor) + ½·P(tie) over paired prompts."""
  return stats.win_rate_stats(r_policy_N, r_anchor_N)["win_rate"]


def _judge_fn(judge: runs.Trained):
  """r_B of a second RM (same backbone) on prompt + response sequences (its params passed, not closed over)."""
  fn = jax.jit(lambda tr, base, ids, mask: trained.scores(judge.model_cfg, judge.stage, tr, base, ids, mask))
  return lambda ids, mask: fn(judge.trainable, judge.frozen, ids, mask)


def sampling_config(rlcfg: RLConfig, n: int) -> RLConfig:
  """The run's sampling settings with n samples per prompt; the learner's settings (which the eval never uses)
  reset so that any run's config, RLOO's or PPO's included, is valid with any n."""
  return dataclasses.replace(rlcfg, algorithm="reinforce", samples_per_prompt=n, ppo_epochs=1, num_minibatches=1,
                             value_warmup_steps=0)


def _eval_fns(policy: runs.Trained, n: int):
  """(sampler(trainable) -> sample(ids, mask, rng), score(samples, with_ref) -> (RM score_B, ref log-probs_BxN or
  0)), jitted with params as arguments (a closure would bake them into the program as constants). A policy
  samples from its adapters merged into the backbone (one set of weights per decode step, as for inference; on a
  quantized base the adapters stay separate, roles.sampling_model);
  scoring has no value pass, and the reference pass only where KL is reported (the policy's samples)."""
  rlcfg = sampling_config(policy.stage, n)
  # (params, adapter trees) are jit arguments; the adapters' scales are constants of the run.
  scales = [s for _, s in roles.sampling_model(rlcfg, policy.trainable, policy.frozen, merge=False)[1]]
  def model_arrays(tr, fr):
    params, adapters = roles.sampling_model(rlcfg, tr, fr)
    return params, [tree for tree, _ in adapters]
  merge = jax.jit(model_arrays)
  sample_jit = jax.jit(lambda model, ids, mask, rng: rollout.sample_with(
      policy.model_cfg, rlcfg, model[0], list(zip(model[1], scales)), ids, mask, rng, policy.mesh))

  def score(fr, s, with_ref: bool):
    ids, mask = roles.sequence(s["prompt_BxP"], s["prompt_mask_BxP"], s["tokens_BxN"], s["mask_BxN"])
    r_B = roles.rewards(policy.model_cfg, rlcfg, fr, ids, mask)
    if not with_ref:  # The anchor's samples need no KL.
      return r_B, jnp.zeros(s["mask_BxN"].shape, jnp.float32)
    ref = roles.reference_logprobs(policy.model_cfg, rlcfg, fr, ids, mask, s["prompt_BxP"].shape[1])
    return r_B, ref * s["mask_BxN"]

  score_jit = jax.jit(score, static_argnums=2)
  stop = setup.host_stop_strings(policy.config, policy.tokenizer, rlcfg.eos_id)
  put = lambda x, k: jnp.asarray(x)

  def sampler(tr):
    model = merge(tr, policy.frozen)

    def sample(ids, mask, rng):
      out = sample_jit(model, ids, mask, rng)
      return rollout.apply_stop_strings(rlcfg, out, policy.tokenizer.decode, stop, put) if stop else out
    return sample

  return sampler, lambda s, with_ref: score_jit(policy.frozen, s, with_ref)


def paired_stats(prefix: str, after_NxK, before_NxK) -> dict:
  """{prefix}reward_before / _after, the paired difference with its 95% bootstrap interval, the win rate with
  its 95% Wilson interval (n = prompts)."""
  diff, lo, hi = stats.paired_bootstrap_ci(after_NxK - before_NxK)
  w = stats.win_rate_stats(after_NxK, before_NxK)
  return {f"{prefix}reward_before": float(before_NxK.mean()), f"{prefix}reward_after": float(after_NxK.mean()),
          f"{prefix}reward_diff": diff, f"{prefix}reward_diff_lo": lo, f"{prefix}reward_diff_hi": hi,
          f"{prefix}win_rate": w["win_rate"], f"{prefix}win_rate_lo": w["win_rate_lo"],
          f"{prefix}win_rate_hi": w["win_rate_hi"]}


def evaluate(policy: runs.Trained, prompts: list, *, batch_size: int = 8, seed: int = 0,
             judge: runs.Trained | None = None, samples_per_prompt: int = 1, with_texts: bool = False) -> dict:
  """Samples the policy and its anchor `samples_per_prompt` times on every prompt (same rng per batch), scores
  both under the RM (and the judge), and returns the figures with their intervals (module docstring).
  with_texts: also "texts", one row per prompt: the prompt, the anchor's (before) and policy's (after) responses
  with their rewards and the policy samples' KL (to judge them offline, e.g. scripts/judge_texts.py)."""
  n = samples_per_prompt
  arrays, n_trunc = data.encode_prompts(prompts, policy.tokenizer, policy.config.data.max_prompt_len)
  sampler, score_fn = _eval_fns(policy, n)
  anchor = anchor_trainable(policy.stage, policy.trainable, policy.frozen)
  samplers = {"pol": sampler(policy.trainable), "anc": sampler(anchor)}
  judge_fn = None if judge is None else _judge_fn(judge)
  out = {k: [] for k in ("r_pol", "r_anc", "kl", "len_pol", "len_anc", "fin_pol", "fin_anc", "j_pol", "j_anc")}
  sample, texts = {}, {"prompt": [], "before": [], "after": []}
  # Each process reads its rows of every global batch; the batch is one global array over the run's mesh (as in
  # training), and what comes back is gathered whole on every process (rollout.to_host).
  it = data.BatchIterator(arrays, batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
                          process_index=jax.process_index(), process_count=jax.process_count())
  t0, done = time.perf_counter(), 0
  for i, batch in enumerate(it):
    if jax.process_count() > 1:
      g = sharding.global_batch({k: batch[k] for k in ("input_ids", "attention_mask", "valid")}, policy.mesh)
      ids, mask, valid = g["input_ids"], g["attention_mask"], rollout.to_host({"v": g["valid"]})["v"]
    else:
      ids, mask, valid = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), batch["valid"]
    valid = np.repeat(valid.astype(bool), n)
    rng = jax.random.fold_in(jax.random.key(seed), i)
    for name in ("pol", "anc"):
      s = samplers[name](ids, mask, rng)
      score_B, ref_BxN = score_fn(s, name == "pol")
      b = rollout.to_host({**s, "score_B": score_B, "ref_logp_BxN": ref_BxN})
      m = b["mask_BxN"].astype(np.float64)
      if i == 0:  # The first prompt's responses, as text, before (anchor) and after (policy).
        sample["prompt"] = policy.tokenizer.decode(b["prompt_BxP"][0][b["prompt_mask_BxP"][0] > 0])
        sample["before" if name == "anc" else "after"] = policy.tokenizer.decode(b["tokens_BxN"][0][m[0] > 0])
      if with_texts:
        rows = np.flatnonzero(valid)
        texts["before" if name == "anc" else "after"] += [policy.tokenizer.decode(b["tokens_BxN"][j][m[j] > 0])
                                                          for j in rows]
        if name == "pol":
          texts["prompt"] += [policy.tokenizer.decode(b["prompt_BxP"][j][b["prompt_mask_BxP"][j] > 0])
                              for j in rows[::n]]
      out[f"r_{name}"].append(b["score_B"][valid])
      out[f"len_{name}"].append(m.sum(1)[valid])
      out[f"fin_{name}"].append(b["finished_B"][valid])
      if name == "pol":  # Σ_t log π(y_t) − log π_ref(y_t) over the policy's own samples (k1 per sequence).
        out["kl"].append(((b["sampler_logp_BxN"] - b["ref_logp_BxN"]) * m).sum(1)[valid])
      if judge_fn is not None:
        seq_ids, seq_mask = roles.sequence(b["prompt_BxP"], b["prompt_mask_BxP"], b["tokens_BxN"], b["mask_BxN"])
        out[f"j_{name}"].append(rollout.to_host({"j": judge_fn(seq_ids, seq_mask)})["j"][valid])
    done += int(valid.sum()) // n
    spent = time.perf_counter() - t0
    log.info("eval: %d/%d prompts, %.0f s, ETA %.0f s (policy and anchor sampled and scored)", done, len(prompts),
             spent, spent / done * (len(prompts) - done))
  cat = {k: np.concatenate(v).astype(np.float64).reshape(-1, n) if v else None for k, v in out.items()}
  kl, kl_lo, kl_hi = stats.paired_bootstrap_ci(cat["kl"])
  result = {"num_prompts": len(prompts), "samples_per_prompt": n, "num_truncated": int(n_trunc),
            "step": policy.step, **paired_stats("", cat["r_pol"], cat["r_anc"]), "kl": kl, "kl_lo": kl_lo, "kl_hi": kl_hi,
            "finished_fraction_after": float(cat["fin_pol"].mean()),
            "finished_fraction_before": float(cat["fin_anc"].mean()),
            "response_length_after": float(cat["len_pol"].mean()),
            "response_length_before": float(cat["len_anc"].mean()), "sample": sample}
  if judge_fn is not None:
    result.update(paired_stats("judge_", cat["j_pol"], cat["j_anc"]))
  if with_texts:
    result["texts"] = [{"prompt": p, "before": texts["before"][i * n:(i + 1) * n],
                        "after": texts["after"][i * n:(i + 1) * n], "reward_before": cat["r_anc"][i].tolist(),
                        "reward_after": cat["r_pol"][i].tolist(), "kl": cat["kl"][i].tolist(),
                        **({} if judge_fn is None else {"judge_before": cat["j_anc"][i].tolist(),
                                                        "judge_after": cat["j_pol"][i].tolist()})}
                       for i, p in enumerate(texts["prompt"])]
  return result


def held_out_prompts(config, fmt: str, path, split: str = "eval", skip_invalid: bool = True) -> list:
  """Prompts of `path` (`config`: the RL run's config, runs.read_config): "all" every one; "eval" / "train" the
  run's own conversation split; "dev" the training split's prompts the run did not train on (those after its first
  data.max_train_prompts), for choosing recipes without looking at the held-out prompts."""
  prompts = data.read_prompts(fmt, path, skip_invalid=skip_invalid)
  if split == "all":
    return prompts
  train, held = data.split_by_group(prompts, config.data.eval_fraction, seed=config.data.seed)
  if split == "dev":
    if not config.data.max_train_prompts:
      raise data.DataError(path, field="data.max_train_prompts", problem="0: the run trained on every prompt of "
                           "its training split, so it has no dev prompts")
    return train[config.data.max_train_prompts:]
  return held if split == "eval" else train


def check_judge(model_cfg, tokenizer, judge: runs.Trained, where: str) -> None:
  """A judge RM must score sequences of the policy's tokenizer on the same backbone shape."""
  same = dataclasses.replace(judge.model_cfg, dtype=model_cfg.dtype, remat=model_cfg.remat,
                             attention=model_cfg.attention)
  if same != model_cfg or judge.tokenizer.get_vocab() != tokenizer.get_vocab():
    raise models.ConfigError(f"{where}: the judge RM has another backbone or tokenizer than the policy")


TEXTS_FILE = "eval_texts_{step}.jsonl"  # One per held-out eval of an RL run (train_rl), one row per prompt.


def texts_path(workdir, step: int) -> pathlib.Path:
  """Where train_rl writes the eval texts of step `step` (evaluate(..., with_texts=True)["texts"])."""
  return pathlib.Path(workdir) / TEXTS_FILE.format(step=step)


def read_texts(workdir) -> dict[int, list[dict]]:
  """Every eval_texts_STEP.jsonl of an RL run folder as {step: rows}, in step order ({} when there is none)."""
  found = {}
  for path in pathlib.Path(workdir).glob(TEXTS_FILE.format(step="*")):
    m = re.fullmatch(TEXTS_FILE.format(step=r"(\d+)").replace(".", r"\."), path.name)
    if m:
      found[int(m.group(1))] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return dict(sorted(found.items()))
