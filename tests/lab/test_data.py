"""Turning text into batches: packing."""

import pytest

from fieldguide.lab.data import pack_texts


def test_packing_too_little_text_is_an_error(micro_tokenizer):
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_texts(micro_tokenizer, ["the fox"], block_size=512)
