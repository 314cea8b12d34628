"""The Field Guide's lab: the shared code that every example on the site stands on.

A tiny tokenizer and corpus built in code, a tiny Llama-architecture base model pretrained on
that corpus, three fine-tuning tasks with metrics, and one training loop. Each technique page
adds a short module on top of these.
"""
