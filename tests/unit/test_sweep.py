"""`oocrlab sweep`: the grid's run names and its refusals. Sweeps of whole tiny runs (killed and resumed, changed,
with a failing run) are in tests/system/test_sweep_runs.py."""

import pytest

from oocrlab.errors import UserError
from oocrlab.sweep import read_sweep, sweep_configs
from tests.helpers import write_yaml


def test_grid_names_and_refusals(tmp_path):
    sweep = read_sweep(write_yaml(tmp_path / "s.yaml", {"out": "runs/s", "grid": {"seed": [0, 1], "data.hidden_city": ["Paris", "São Paulo"]}}))
    configs = sweep_configs(sweep)
    assert list(configs) == ["seed-0_hidden_city-Paris", "seed-0_hidden_city-São-Paulo", "seed-1_hidden_city-Paris",
                             "seed-1_hidden_city-São-Paulo"]
    assert configs["seed-1_hidden_city-São-Paulo"].seed == 1 and configs["seed-1_hidden_city-São-Paulo"].data.hidden_city == "São Paulo"
    for content, message in [
        ({"grid": {"seed": [0]}}, "names no out directory"),
        ({"out": "x", "grid": {"seed": 0}}, "non-empty lists"),
        ({"out": "x", "grid": {"seed": [0]}, "sett": {}}, "must be a mapping with keys out, grid and set"),
        ({"out": "x", "grid": {"train.learning_rat": [1e-3]}}, "did you mean 'learning_rate'"),
        ({"out": "x", "grid": {"seed": [0, "0"]}}, "share the run directory"),
    ]:
        with pytest.raises(UserError, match=message):
            sweep_configs(read_sweep(write_yaml(tmp_path / "bad.yaml", content)))
