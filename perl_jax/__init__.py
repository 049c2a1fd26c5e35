"""perl_jax: Parameter-Efficient RLHF (PERL) in JAX."""
import os

# transformers (tokenizers and configs only: the runtime has no PyTorch) would print its "PyTorch was not found"
# advice on import; that is expected here, so it is silenced unless the user set the variable.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
