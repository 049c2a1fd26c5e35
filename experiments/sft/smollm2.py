"""SFT of SmolLM2-135M-Instruct (the embedded GGUF), the anchor that RL starts from: PERL (LoRA) vs full tuning.

  python scripts/train_sft.py --config experiments/sft/smollm2.py:tm4_lora --workdir runs/sft_tm4_lora
Arguments: {tm4,hh,custom}_{lora,full}. tm4 = Taskmaster-4 coffee dialogs (every agent turn, API calls included, is a
target), hh = Anthropic HH-RLHF harmless chosen dialogs (every Assistant turn is a target). The loss is the
token-weighted mean cross-entropy on assistant tokens; eval reports held-out loss, token accuracy, perplexity.
Any field can be overridden: --config.steps=50.
"""
import ml_collections

DATA = {
    # 3,710 dialogs, median 566 tokens under the chat template (99th pct 1,024): ~3% are cut at 1,024 tokens.
    # 20 lines hold malformed JSON in an API annotation: skipped (logged), 3,690 dialogs remain.
    "tm4": dict(format="taskmaster4_dialogs", path="experiments/data/taskmaster4/dialogs.jsonl.gz", max_len=1024,
                skip_invalid=True),
    # 2,010 chosen dialogs, median 160 tokens (99th pct 681); 4 lines have an empty chosen reply (skipped).
    "hh": dict(format="hh_rlhf", path="experiments/data/hh-rlhf-harmless/pairs.jsonl.gz", max_len=512,
               skip_invalid=True),
    # Your own dialogs: any SFT format (messages, preference, unpaired_preference, ...); point data.path at the file.
    "custom": dict(format="messages", path="experiments/data/examples/messages.jsonl", max_len=512, skip_invalid=False),
}


def get_config(arg: str = "tm4_lora") -> ml_collections.ConfigDict:
  dataset, _, mode = arg.partition("_")
  if dataset not in DATA or mode not in ("lora", "full"):
    raise ValueError(f"config argument {arg!r}: expected DATASET_MODE, DATASET one of {sorted(DATA)}, MODE lora or "
                     "full (e.g. tm4_lora)")
  c = ml_collections.ConfigDict()
  c.seed = 0  # LoRA init and the run's RNG.
  c.mode = mode  # "lora": PERL, base frozen; "full": every base param trained (float32 copy).
  # Empty path = the embedded SmolLM2-135M-Instruct GGUF; param/compute dtypes; remat "none" | "full" | "dots" |
  # "auto" ("dots" on CPU: 0.97x the step time, 0.72x the compiled peak of "none" at 8 x 256 there; "none" elsewhere).
  # path: "" = the embedded SmolLM2-135M-Instruct GGUF, else a .gguf file, an HF folder or a Hub id ("org/name",
  # resolved online or from the HF cache; revision: a Hub branch, tag or commit, "" = main).
  # quant: the frozen base's layer kernels stored "int8" (per output channel) or "nf4" (4-bit NormalFloat, blocks of
  # quant_block input rows), dequantized one projection at a time in the forward; LoRA mode only. "none": as loaded.
  # quant_double: nf4's block scales stored as int8 around their layer's mean (QLoRA's double quantization).
  # attention: the kernel (docs/models.md); "chunked_map" holds the least activation memory on inputs > 256 tokens.
  c.model = dict(path="", revision="", param_dtype="float32", dtype="float32", remat="auto", attention="auto",
                 quant="none", quant_block=64, quant_double=False)
  c.data = dict(  # The SFT dialogs:
      eval_path="",  # A separate held-out file; empty = split data.path by conversation.
      eval_fraction=0.1,  # Held-out share of conversations (seeded hash of the conversation id).
      seed=0,  # Split and shuffling seed.
      shuffle_seed=-1,  # Batch-order seed alone; -1: data.seed.
      batch_size=8, eval_batch_size=16,  # Global batch sizes (dialogs); divisible by data x fsdp devices.
      max_train_examples=0, max_eval_examples=0,  # 0 = all.
      bucket_by_length=False,  # Batches of similar lengths cut to 64-token buckets (fewer pad tokens).
      **DATA[dataset])  # format, path, max_len (tokens per dialog; longer ones keep their start), skip_invalid.
  c.lora = dict(rank=4, alpha=8.0, targets="attention")  # As the RMs: attention q/k/v/o, rank 4, α/r = 2.
  # AdamW: linear warm-up over warmup_steps, then cosine; global-norm clipping.
  c.optim = dict(lr=5e-4 if mode == "lora" else 2e-5, warmup_steps=20, weight_decay=0.0, clip_norm=1.0)
  c.steps = 300  # Optimizer steps (a step = one global batch).
  c.log_every = 5  # Train metrics cadence (steps).
  c.eval_every = 100  # Held-out eval cadence (and at the last step).
  c.checkpoint_every = 50  # Orbax checkpoint cadence (and at the last step).
  c.keep_checkpoints = 2  # Newest checkpoints kept.
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1 = all remaining devices.
  c.multihost = False  # jax.distributed.initialize() first (one process per host).
  return c
