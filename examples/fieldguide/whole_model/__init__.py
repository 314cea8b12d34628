"""Fine-tuning a whole model: full fine-tuning, instruction tuning, continued pretraining,
distillation, and how to evaluate the result."""
