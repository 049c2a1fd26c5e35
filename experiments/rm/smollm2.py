"""Reward models on SmolLM2-135M-Instruct (the embedded GGUF): PERL (LoRA) vs full tuning.

  python scripts/train_reward.py --config experiments/rm/smollm2.py:tm4_lora --workdir runs/tm4_lora
Arguments: {tm4,hh,custom}_{lora,full}. tm4 = Taskmaster-4 thumbs up/down (BCE, the paper's released data),
hh = Anthropic HH-RLHF harmless pairs (Bradley-Terry). Any field can be overridden: --config.steps=50.
"""
import ml_collections

DATA = {
    "tm4": dict(format="taskmaster4", path="experiments/data/taskmaster4/reward.jsonl.gz", max_len=192,
                skip_invalid=False),
    "hh": dict(format="hh_rlhf", path="experiments/data/hh-rlhf-harmless/pairs.jsonl.gz", max_len=160,
               skip_invalid=True),  # 4 lines of the public file have an empty chosen reply.
    # Your own preferences: preference (Bradley-Terry) or unpaired_preference (BCE); point data.path at the file.
    "custom": dict(format="preference", path="experiments/data/examples/preference.jsonl", max_len=256,
                   skip_invalid=False),
}


def get_config(arg: str = "tm4_lora") -> ml_collections.ConfigDict:
  dataset, _, mode = arg.partition("_")
  if dataset not in DATA or mode not in ("lora", "full"):
    raise ValueError(f"config argument {arg!r}: expected DATASET_MODE, DATASET one of {sorted(DATA)}, MODE lora or "
                     "full (e.g. tm4_lora)")
  c = ml_collections.ConfigDict()
  c.seed = 0  # Init (LoRA A, a random head) and the run's RNG; the split and batch order are data.seed/shuffle_seed.
  c.mode = mode  # "lora": PERL, backbone frozen; "full": a float32 backbone copy is trained.
  # remat "auto": "dots" on CPU (0.87x the step time, 0.66x the compiled peak of "none" there), "none" elsewhere.
  # path: "" = the embedded SmolLM2-135M-Instruct GGUF, else a .gguf file, an HF folder or a Hub id ("org/name",
  # resolved online or from the HF cache; revision: a Hub branch, tag or commit, "" = main).
  # quant: the frozen base's layer kernels stored "int8" (per output channel) or "nf4" (4-bit NormalFloat, blocks of
  # quant_block input rows), dequantized one projection at a time in the forward; LoRA mode only. "none": as loaded.
  # quant_double: nf4's block scales stored as int8 around their layer's mean (QLoRA's double quantization).
  # attention: the kernel (docs/models.md); "chunked_map" holds the least activation memory on inputs > 256 tokens.
  c.model = dict(path="", revision="", param_dtype="float32", dtype="float32", remat="auto", attention="auto",
                 quant="none", quant_block=64, quant_double=False)
  # eval_path: a separate held-out file ("" = split data.path, eval_fraction of it, split seed `seed`); global batch
  # sizes; min_prompt_tokens of prompt kept when a long example is cut to max_len; max_*_examples 0 = all.
  c.data = dict(eval_path="", eval_fraction=0.1, seed=0, batch_size=16, eval_batch_size=32,
                min_prompt_tokens=64, max_train_examples=0, max_eval_examples=0,
                bucket_by_length=True,  # Batches of similar lengths cut to 64-token buckets (fewer pad tokens).
                dev_fraction=0.0,  # >0: evaluate on a dev split carved from the training part (recipe search).
                shuffle_seed=-1,  # Batch-order seed; -1: data.seed (which also fixes the held-out split).
                bootstrap_seed=-1,  # >=0: train on a bootstrap resample of the training split (ensemble members).
                **DATA[dataset])
  c.init_from = ""  # An SFT run folder (same model): the RM starts from that SFT model, adapter merged; "" = the base.
  c.lora = dict(rank=4, alpha=8.0, targets="attention")  # Paper: attention projections, ranks 1-16.
  # AdamW: linear warm-up over warmup_steps, then cosine; global-norm clipping.
  c.optim = dict(lr=5e-4 if mode == "lora" else 2e-5, warmup_steps=10, weight_decay=0.0, clip_norm=1.0,
                 head_lr_mult=1.0)  # The scalar head's lr = lr × head_lr_mult.
  c.pos_weight = 1.0  # BCE (binary data): weight of positive labels.
  c.head_init = "probe"  # LP-FT: the head starts as a logistic probe of the frozen model's features ("random": N(0, 1/D)).
  c.probe_examples = 1024  # head_init="probe": fit on the first N training examples (0 = all of them).
  c.probe_cs = (0.001, 0.01, 0.1, 1.0)  # Inverse L2 strengths (sklearn's C) the probe cross-validates over (log loss).
  c.probe_cache = ""  # Folder memoising the probe's frozen features across runs (sweeps); "" = off.
  c.balance_classes = False  # BCE: pos_weight = n_neg / n_pos of the training split (overrides pos_weight).
  # Gradient accumulation: each step's data.batch_size rows in N equal microbatches, one after another (the same
  # update, about 1/N of the activation memory; the 7B LoRA RM step on an nf4 base fits 16 GB with N = 4).
  c.num_microbatches = 1
  c.steps = 120  # The 2-core CPU budget (<= 60 min a run); an accelerator run: steps=2000, max_len=1024.
  c.log_every = 5  # Train metrics and progress line cadence (steps).
  c.eval_every = 40  # Learning curves: held-out eval at steps 40, 80, 120.
  c.checkpoint_every = 40  # Orbax checkpoint cadence (and at the last step).
  c.keep_checkpoints = 2  # Newest checkpoints kept.
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # Device mesh axes; -1 = all remaining devices.
  c.multihost = False  # True: jax.distributed.initialize() first (one process per host).
  return c
