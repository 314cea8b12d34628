"""Start here: the tutorial, one fine-tune from the base model to a working model."""
