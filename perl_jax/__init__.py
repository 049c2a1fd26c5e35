"""perl_jax: Parameter-Efficient RLHF (PERL) in JAX."""
