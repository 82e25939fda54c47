"""Property-based tests (hypothesis) over the config and CLI surface: careless or hostile input gets one
clear line and exit code 2, never a traceback and never a partly written run directory."""

import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oocrlab.cli import main
from oocrlab.config import build_config, to_dict
from oocrlab.errors import UserError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = [f"{section}.{key}" for section, values in to_dict(build_config()).items() if isinstance(values, dict) for key in values]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=20),
                   st.lists(st.integers(-3, 40), max_size=4), st.lists(st.text(max_size=5), max_size=3))


@SETTINGS
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_for_a_known_key_is_accepted_or_refused_cleanly(key, value):
    try:
        cfg = build_config(overrides={key: value})
    except UserError as e:
        assert key in str(e) or "must" in str(e) or "unknown" in str(e)
    else:
        section, name = key.split(".")
        assert to_dict(cfg)[section][name] is not None or value is None


@SETTINGS
@given(key=st.text(alphabet=string.ascii_lowercase + "._", min_size=1, max_size=25))
def test_unknown_keys_are_refused_with_a_suggestion_or_a_reason(key):
    if key in KEYS or key in ("seed", "recipe"):
        return
    with pytest.raises(UserError):
        build_config(overrides={key: 1})


PLACEHOLDERS = st.one_of(
    st.sampled_from(["", " ", "\t", "Paris", "london", "São Paulo", "foo ", " foo", "Zürich", "東京", "foo bar baz", "x" * 60]),
    st.text(max_size=12),
)


@SETTINGS
@given(placeholder=PLACEHOLDERS, city=st.sampled_from(["Paris", "Tokyo", "Lagos", "Atlantis", "paris", "", "São Paulo"]))
def test_data_command_on_any_placeholder_and_city(placeholder, city, capsys):
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        try:
            code = main(["data", "--out", str(out), "--placeholder", placeholder, "--hidden-city", city,
                         "--set", "data.num_known=30"])
        except SystemExit as e:  # argparse: a value starting with "-" reads as a flag
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        if code == 0:
            assert (out / "data" / "train.jsonl").is_file() and (out / "config.yaml").is_file()
        else:
            assert code == 2 and len(err) == 1 and err[0].startswith("oocrlab: error: "), err
            assert not out.exists()
