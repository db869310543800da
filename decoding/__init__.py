"""Jitted generation over `models`: sampling (`generate`), beam search, logits processors, and the CLI."""
