"""Data: record files (files: JSON lines, Parquet, Arrow), the generic TRL-style formats (generic) and the paper's
data sets (readers), tokenisation and batching (pipeline); whole dialogs for SFT and RL prompt sets (dialogs,
chat)."""
from perl_jax.data.chat import encode_prompts
from perl_jax.data.chat import encode_sft
from perl_jax.data.dialogs import PROMPT_FORMATS
from perl_jax.data.dialogs import SFT_FORMATS
from perl_jax.data.dialogs import read_dialogs
from perl_jax.data.dialogs import read_prompts
from perl_jax.data.dialogs import read_tm4_dialogs
from perl_jax.data.dialogs import split_by_group
from perl_jax.data.pipeline import BatchIterator
from perl_jax.data.pipeline import encode_binary
from perl_jax.data.pipeline import encode_pairwise
from perl_jax.data.pipeline import split_train_eval
from perl_jax.data.pipeline import truncate
from perl_jax.data.readers import DataError
from perl_jax.data.readers import KINDS
from perl_jax.data.readers import READERS
from perl_jax.data.readers import read_examples
from perl_jax.data.readers import read_hh_rlhf
from perl_jax.data.readers import read_shp
from perl_jax.data.readers import read_taskmaster4
from perl_jax.data.readers import read_tldr
