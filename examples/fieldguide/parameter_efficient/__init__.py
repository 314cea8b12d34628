"""Parameter-efficient fine-tuning: methods that train a few added or chosen parameters
and leave the rest of the model frozen."""
