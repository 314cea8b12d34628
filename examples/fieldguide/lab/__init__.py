"""The lab: what every page of the Field Guide stands on.

A corpus and tokenizer built in code, the tiny Llama-architecture base model pretrained on
them, the shared tasks with their metrics and error bars, one training loop, the loading and
command-line code every example uses, and the experiment harness that runs a technique.
Technique modules import from here and from nowhere else in ``fieldguide``.
"""
