"""Foundations: what LLMs are, which ones exist, and when to fine-tune one at all."""
