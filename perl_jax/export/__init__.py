"""Trained runs written for Hugging Face transformers or PEFT: a reward model (`export.reward`) or an RL policy
(`export.policy`). Its CLI is scripts/export.py."""
