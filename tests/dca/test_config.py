import dataclasses

import pytest

from dca import DCAConfig


def test_defaults_follow_the_spec():
    c = DCAConfig(4096)
    assert (c.chunk_size, c.local_window, c.chunk_len) == (3072, 512, 2560)
    assert c.inter_query_id == 3072  # min(2L - 1, S)
    c = DCAConfig(pretraining_length=8192)
    assert (c.chunk_size, c.local_window, c.chunk_len) == (6144, 1024, 5120)


def test_explicit_values_and_frozen():
    c = DCAConfig(32, chunk_size=24, local_window=4, temperature_alpha=0.1, backend="torch")
    assert c.chunk_len == 20 and c.inter_query_id == 24
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.chunk_size = 10
    assert DCAConfig.from_dict(c.to_dict()) == c


def test_inter_query_id_when_chunks_are_short():
    # L = 5, S = 16: the constant inter-chunk query id is 2L - 1 = 9, not S.
    assert DCAConfig(16, chunk_size=16, local_window=11).inter_query_id == 9


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(pretraining_length=0), "pretraining_length"),
        (dict(pretraining_length=32, chunk_size=40), "chunk_size"),
        (dict(pretraining_length=32, chunk_size=0), "chunk_size"),
        (dict(pretraining_length=32, chunk_size=16, local_window=16), "local_window"),
        (dict(pretraining_length=32, local_window=0), "local_window"),
        (dict(pretraining_length=32, temperature_alpha=-0.1), "temperature_alpha"),
        (dict(pretraining_length=32, backend="cuda"), "backend"),
        (dict(pretraining_length=32.0), "pretraining_length"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DCAConfig(**kwargs)


def test_from_dict_rejects_unknown_fields(tmp_path):
    with pytest.raises(ValueError, match="chunk"):
        DCAConfig.from_dict({"pretraining_length": 32, "chunk": 3})
    path = tmp_path / "dca.json"
    path.write_text('{"dca": {"pretraining_length": 64, "temperature_alpha": 0.05}}')
    assert DCAConfig.from_file(path) == DCAConfig(64, temperature_alpha=0.05)
