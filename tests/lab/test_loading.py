"""Loading by name: a clear error for a model that cannot be loaded."""

import pytest

from fieldguide.lab.loading import ModelLoadError, load_model


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/no/such/model", "no such directory"),
        ("./missing", "no such directory"),
        ("nobody/no-such-model", "cannot load model 'nobody/no-such-model'"),
    ],
)
def test_a_model_that_cannot_be_loaded_gives_a_clear_error(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(name)
