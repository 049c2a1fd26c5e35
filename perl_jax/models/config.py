"""Model config: one frozen dataclass for every supported decoder family, parsed from HF `config.json`."""
import dataclasses
import json
import pathlib
from typing import Any

from perl_jax.errors import ConfigError  # noqa: F401 (models.ConfigError)

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
_MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3",
}
_ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_KINDS = ("auto", "xla", "cudnn", "chunked", "einsum", "recompute", "causal", "chunked_map")


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary embedding parameters (HF `rope_parameters`): theta and an optional scaling rule."""
  theta: float = 10000.0
  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture (from config.json) plus run-time choices (dtype, remat, scan); hashable for jit."""
  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope: Rope = Rope()
  rope_local: Rope | None = None          # Gemma 3 sliding layers use their own base frequency.
  tie_embeddings: bool = False
  qkv_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  activation: str = "silu"                # "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
  norm_plus_one: bool = False             # Gemma: RMSNorm scales by (1 + w).
  sandwich_norm: bool = False             # Gemma: extra norms after attention and MLP.
  scale_embeddings: bool = False          # Gemma: embeddings times sqrt(hidden_size).
  query_scale: float | None = None        # Gemma: query_pre_attn_scalar ** -0.5.
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_window: int | None = None
  sliding_layers: tuple[bool, ...] = ()   # Per layer: True where attention is windowed.
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  max_position_embeddings: int | None = None  # The context the model was trained for (None: not given).
  # Run-time choices, not architecture.
  dtype: str = "float32"                  # Compute dtype; params keep their own dtype (resolve_dtype: "auto").
  remat: str = "none"                     # "none" | "full" | "dots" (save matmul outputs) | "auto" (dots on
                                          # XLA:CPU, where recomputing beats storing activations; none elsewhere).
  scan_layers: bool = True
  attention: str = "auto"                 # "auto" | "xla" | "cudnn" (jax.nn.dot_product_attention) |
                                          # "chunked" (query blocks, O(block x S) scores) | "einsum" |
                                          # "recompute" (saves row statistics, not probabilities, for backward) |
                                          # "causal" ("recompute" over query blocks of 64, each reading only
                                          # the keys up to its end; "auto" up to attention_block tokens) |
                                          # "chunked_map" (query blocks one after another in a lax.map, each
                                          # reading every key, masked: the least memory, more score FLOPs).
  attention_block: int = 256              # Query block for "chunked"; "auto" chunks inputs longer than it.

  def __post_init__(self):
    if self.attention not in ATTENTION_KINDS:
      raise ConfigError(f"config: field 'model.attention': must be {'|'.join(ATTENTION_KINDS)}, got '{self.attention}'")
    if self.remat not in ("none", "full", "dots", "auto"):
      raise ConfigError(f"config: field 'model.remat': must be none|full|dots|auto, got '{self.remat}'")
    if not self.sliding_layers:
      object.__setattr__(self, "sliding_layers", (False,) * self.num_layers)
    if len(self.sliding_layers) != self.num_layers:
      raise ConfigError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")

  @property
  def attn_scale(self) -> float:
    return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5


def _rope(d: dict[str, Any], where: str) -> Rope:
  kind = d.get("rope_type", d.get("type", "default"))
  if kind not in _ROPE_TYPES:
    raise ConfigError(f"{where}: rope type '{kind}' is not supported (supported: {', '.join(_ROPE_TYPES)})")
  return Rope(theta=float(d.get("rope_theta", 10000.0)), kind=kind, factor=float(d.get("factor", 1.0)),
              low_freq_factor=float(d.get("low_freq_factor", 1.0)),
              high_freq_factor=float(d.get("high_freq_factor", 4.0)),
              original_max_position=int(d.get("original_max_position_embeddings", 8192)))


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def from_hf_dict(hf: dict[str, Any], where: str = "config.json", **overrides) -> ModelConfig:
  """Maps a Hugging Face config dict (old hub style or transformers-5 style) to a ModelConfig."""
  if "text_config" in hf and hf.get("model_type") == "gemma3":
    hf = {**hf["text_config"], "model_type": "gemma3_text"}
  model_type = hf.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ConfigError(f"{where}: field 'model_type': unsupported architecture '{model_type}' "
                      f"(supported: {', '.join(sorted(_MODEL_TYPES))})")
  family = _MODEL_TYPES[model_type]
  try:
    n_layers, n_heads, hidden = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
    vocab, inter = hf["vocab_size"], hf["intermediate_size"]
  except KeyError as e:
    raise ConfigError(f"{where}: field '{e.args[0]}': missing") from None
  gemma = family in ("gemma2", "gemma3")
  rope_params = hf.get("rope_parameters") or {}
  rope_local = None
  if family == "gemma3":
    if "full_attention" in rope_params:
      rope = _rope(rope_params["full_attention"], where)
      rope_local = _rope(rope_params.get("sliding_attention", {}), where)
    else:
      rope = _rope({"rope_theta": hf.get("rope_theta", 1e6), **(hf.get("rope_scaling") or {})}, where)
      rope_local = Rope(theta=float(hf.get("rope_local_base_freq", 10000.0)))
  elif rope_params:
    rope = _rope(rope_params, where)
  else:
    rope = _rope({"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}, where)

  window = hf.get("sliding_window")
  layer_types = hf.get("layer_types")
  if layer_types:
    sliding = tuple(t == "sliding_attention" for t in layer_types)
  elif family == "gemma2":
    sliding = tuple(i % 2 == 0 for i in range(n_layers))
  elif family == "gemma3":
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    sliding = tuple((i + 1) % pattern != 0 for i in range(n_layers))
  elif family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
    sliding = tuple(i >= hf.get("max_window_layers", n_layers) for i in range(n_layers))
  else:
    sliding = (window is not None and family == "llama",) * n_layers
  if not any(sliding) or window is None:
    sliding, window = (False,) * n_layers, None

  act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
  if act in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
    act = "gelu_tanh"
  elif act != "silu":
    raise ConfigError(f"{where}: field 'hidden_act': unsupported activation '{act}'")
  kwargs = dict(
      family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=n_layers,
      num_heads=n_heads, num_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hidden // n_heads, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope=rope, rope_local=rope_local,
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      qkv_bias=bool(hf.get("attention_bias", family == "qwen2")) or family == "qwen2",
      mlp_bias=bool(hf.get("mlp_bias", False)),
      qk_norm=family in ("qwen3", "gemma3"), activation=act, norm_plus_one=gemma, sandwich_norm=gemma,
      scale_embeddings=gemma,
      query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5 if gemma and hf.get("query_pre_attn_scalar") else None,
      attn_softcap=hf.get("attn_logit_softcapping") if gemma else None,
      final_softcap=hf.get("final_logit_softcapping") if gemma else None,
      sliding_window=window, sliding_layers=sliding,
      bos_token_id=_first(hf.get("bos_token_id")), eos_token_id=_first(hf.get("eos_token_id")),
      pad_token_id=_first(hf.get("pad_token_id")),
      max_position_embeddings=int(hf["max_position_embeddings"]) if hf.get("max_position_embeddings") else None)
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def load_hf_config(path: str | pathlib.Path, **overrides) -> ModelConfig:
  """Reads `config.json` from a file or folder."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "config.json"
  if not path.exists():
    raise ConfigError(f"{path}: no such file")
  try:
    hf = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
  return from_hf_dict(hf, where=str(path), **overrides)


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
  """Inverse of from_hf_dict (old hub style), for exporting merged models to transformers."""
  model_type = {"gemma3": "gemma3_text"}.get(cfg.family, cfg.family)
  rope = {"rope_theta": cfg.rope.theta}
  if cfg.rope.kind != "default":
    rope["rope_scaling"] = {"rope_type": cfg.rope.kind, "factor": cfg.rope.factor}
    if cfg.rope.kind == "llama3":
      rope["rope_scaling"].update(low_freq_factor=cfg.rope.low_freq_factor,
                                  high_freq_factor=cfg.rope.high_freq_factor,
                                  original_max_position_embeddings=cfg.rope.original_max_position)
  d = dict(model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
           intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
           num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
           rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
           attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, bos_token_id=cfg.bos_token_id,
           eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, **rope)
  if cfg.max_position_embeddings:
    d["max_position_embeddings"] = cfg.max_position_embeddings
  if cfg.family in ("gemma2", "gemma3"):
    d.update(hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=cfg.attn_softcap,
             final_logit_softcapping=cfg.final_softcap, sliding_window=cfg.sliding_window,
             query_pre_attn_scalar=cfg.attn_scale ** -2,
             layer_types=["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers])
    if cfg.family == "gemma3" and cfg.rope_local is not None:
      d["rope_local_base_freq"] = cfg.rope_local.theta
  else:
    d["hidden_act"] = "silu"
  return d


def resolve_dtype(name: str) -> str:
  """A config's dtype: "auto" is bfloat16 on GPU / TPU and float32 on CPU (where bf16 matmuls are slow and the
  tests compare against float32 oracles); any other name is returned as it is."""
  if name != "auto":
    return name
  import jax
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"
