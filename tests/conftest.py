"""Test setup: 8 fake CPU devices (set before jax is imported), a session compilation cache, shared paths."""
import atexit
import os
import pathlib
import shutil
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# LLVM at -O0: the suite's programs are tiny and compiled hundreds of times, so compiling is most of its time (0.8x the
# default -O2's time on tests/sampling_test.py). HLO passes and buffer assignment are unchanged; sums may round in
# another order, so two different programs agree to float tolerance, not bit for bit.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Many tests compile the same tiny steps again (a resumed run, a CLI subprocess, the same model in another test):
# JAX's persistent compilation cache in a fresh folder for this session (inherited by subprocesses) loads those
# executables instead of recompiling (halves the RM training tests). Deleted at exit; an outer setting wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="perl_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

# The model cache (perl_jax.models.cache: a GGUF's dequantized tensors and tokenizer) in a fresh folder for this
# session, so tests never read or fill the user's cache; an outer setting wins.
if "PERL_JAX_CACHE" not in os.environ:
  _model_cache = tempfile.mkdtemp(prefix="perl_jax_tests_model_cache_")
  atexit.register(shutil.rmtree, _model_cache, ignore_errors=True)
  os.environ["PERL_JAX_CACHE"] = _model_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# What a CLI test's bare environment still inherits from this session: the compile settings and caches above (so a
# subprocess neither recompiles at -O2 what the suite has cached nor touches the user's model cache).
SESSION_ENV = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "PERL_JAX_CACHE")


def bare_env(**extra) -> dict:
  """A minimal environment for a CLI subprocess (no PYTHONPATH, no user settings) plus SESSION_ENV and `extra`."""
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **extra}
  return {**env, **{k: os.environ[k] for k in SESSION_ENV if k in os.environ}}
