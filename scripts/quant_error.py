"""How far a quantized base's logits move from the float base's, on real text (issue #33); prints one JSON object.

  python scripts/quant_error.py [--model PATH] [--texts 32] [--max_len 128] [--quant int8,nf4,nf4dq,gguf]
                                [--quant_block 64]

The reference is the float32 model as loaded (the embedded SmolLM2 GGUF: its Q4_1 weights dequantized, since the
original float weights are not shipped). Each --quant stores its layer kernels quantized from those floats (int8,
nf4; nf4dq: nf4 with its block scales double-quantized, model.quant_double) or keeps the file's own blocks (gguf,
.gguf files only). Text: the first --texts Taskmaster-4 coffee dialogs,
"User: … / Agent: …" turns, cut to --max_len tokens. Per kind: the mean absolute logit error and the relative error
‖Δ‖/‖logits‖ over every token; the mean KL(p_float ‖ p_quant) per token (nats, T = 1) and the rate at which the
argmax next token agrees, each as a mean over texts with its 95% bootstrap interval over texts.
"""
import gzip
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from perl_jax import cli, runs, stats
from perl_jax.models import quant

_MODEL = flags.DEFINE_string("model", "", "Base model: a .gguf file or an HF folder ('' = the embedded SmolLM2).")
_TEXTS = flags.DEFINE_integer("texts", 32, "Dialogs to read.")
_MAX_LEN = flags.DEFINE_integer("max_len", 128, "Tokens per dialog (cut).")
_QUANT = flags.DEFINE_string("quant", "int8,nf4,nf4dq,gguf", "Comma-separated kinds to compare with the float base "
                             "(nf4dq: nf4 with double-quantized block scales).")
_BLOCK = flags.DEFINE_integer("quant_block", 64, "nf4 block size.")
_DATA = flags.DEFINE_string("data", "experiments/data/taskmaster4/dialogs.jsonl.gz", "Taskmaster-4 dialogs.")


def dialog_texts(path: str, n: int) -> list[str]:
  """The first n dialogs as 'User: …' / 'Agent: …' lines."""
  out = []
  with gzip.open(path, "rt") as f:
    for line in f:
      turns = json.loads(line)["utterances"]
      out.append("\n".join(f"{'User' if u['speaker'] == 'user' else 'Agent'}: {u['text']}" for u in turns))
      if len(out) == n:
        break
  return out


def error_stats(ref_BxTxV, got_BxTxV, mask_BxT) -> dict:
  """Logit error figures of `got` against `ref` at the real tokens (see the module docstring)."""
  m = mask_BxT.astype(bool)
  diff = (got_BxTxV - ref_BxTxV)[m]
  logp_ref, logp_got = jax.nn.log_softmax(ref_BxTxV, -1), jax.nn.log_softmax(got_BxTxV, -1)
  kl_BxT = np.asarray(jnp.sum(jnp.exp(logp_ref) * (logp_ref - logp_got), -1))
  agree_BxT = np.asarray(ref_BxTxV.argmax(-1) == got_BxTxV.argmax(-1))
  per_text = lambda x: np.array([x[i][m[i]].mean() for i in range(len(m))])
  kl, kl_lo, kl_hi = stats.paired_bootstrap_ci(per_text(kl_BxT))
  ag, ag_lo, ag_hi = stats.paired_bootstrap_ci(per_text(agree_BxT.astype(np.float64)))
  return {"mean_abs_logit_error": float(np.abs(diff).mean()), "max_abs_logit_error": float(np.abs(diff).max()),
          "relative_error": float(np.linalg.norm(diff) / np.linalg.norm(ref_BxTxV[m])),
          "kl_per_token": kl, "kl_per_token_lo": kl_lo, "kl_per_token_hi": kl_hi,
          "top1_agreement": ag, "top1_agreement_lo": ag_lo, "top1_agreement_hi": ag_hi}


def _run() -> dict:
  mc = ml_collections.ConfigDict(dict(path=_MODEL.value, revision="", param_dtype="float32", dtype="float32",
                                      remat="none", attention="auto", quant="none", quant_block=_BLOCK.value,
                                      quant_double=False))
  cfg, base, tok = runs.load_model(mc)
  enc = tok(dialog_texts(_DATA.value, _TEXTS.value), max_length=_MAX_LEN.value, truncation=True,
            padding="max_length")
  ids, mask = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
  from perl_jax import models
  logits = jax.jit(lambda p: models.forward(cfg, p, ids, mask).logits)
  ref = np.asarray(logits(base))
  out = {"model": runs.model_path(mc), "texts": len(ids), "tokens": int(mask.sum()), "max_len": _MAX_LEN.value,
         "float_layer_bytes": quant.tree_bytes(base["layers"]), "kinds": {}}
  for name in _QUANT.value.split(","):
    kind = "nf4" if name == "nf4dq" else name
    quant.check_kind(kind, "--quant")
    mc.quant, mc.quant_double = kind, name == "nf4dq"
    qbase = runs.load_model(mc)[1]
    row = error_stats(ref, np.asarray(logits(qbase)), mask)
    row.update(layer_bytes=quant.tree_bytes(qbase["layers"]), quant_block=_BLOCK.value if kind == "nf4" else None)
    out["kinds"][name] = row
  return out


def main(_):
  print(json.dumps(cli.run_or_exit(_run), indent=1))


if __name__ == "__main__":
  cli.app_run(main)
