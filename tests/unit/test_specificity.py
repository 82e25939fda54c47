"""The specificity matrix: its verdicts on synthetic numbers, its assembly from runs' metrics, and what each
run scores for it (probe and multiple choice) on the tiny model."""

import numpy as np
import pytest
import torch

from oocrlab import build_config
from oocrlab.compare import specificity_matrices
from oocrlab.errors import UserError
from oocrlab.probe import rank_among_candidates, scores_against_reference
from oocrlab.specificity import specificity_matrix, specificity_verdict

CITIES = ["Paris", "São Paulo", "Tokyo", "New York City", "Lagos"]


def synthetic(pattern: np.ndarray, seeds: int = 3, noise: float = 0.05, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of [seeds, columns]: the pattern [rows, columns] plus a little noise per seed."""
    rng = np.random.default_rng(seed)
    return {city: pattern[i] + noise * rng.standard_normal((seeds, len(CITIES))) for i, city in enumerate(CITIES)}


def test_a_dominant_diagonal_is_specific():
    verdict = specificity_verdict(synthetic(np.eye(5)), CITIES)
    assert verdict["verdict"] == "specific" and all(s["ci95"][0] > 0 for s in verdict["diagonal_margin"].values())


def test_a_column_that_wins_in_every_row_is_generic():
    pattern = np.zeros((5, 5))
    pattern[:, 2] = 1.0  # Tokyo gains most whichever city was trained
    verdict = specificity_verdict(synthetic(pattern), CITIES)
    assert verdict["verdict"] == "generic" and "Tokyo" in verdict["sentence"] and "São Paulo" not in verdict["sentence"]


def test_a_partial_diagonal_is_neither():
    pattern = np.zeros((5, 5))
    pattern[0, 0] = pattern[1, 1] = 1.0  # two rows find their city, three find nothing
    verdict = specificity_verdict(synthetic(pattern), CITIES)
    assert verdict["verdict"] == "neither" and "2 of 5 rows (Paris, São Paulo)" in verdict["sentence"]


def test_one_seed_or_one_row_is_undecided():
    assert specificity_verdict(synthetic(np.eye(5), seeds=1), CITIES)["verdict"] == "undecided"
    one_row = {"Paris": synthetic(np.eye(5))["Paris"]}
    assert specificity_verdict(one_row, CITIES)["verdict"] == "undecided"


def fake_metrics(city: str, seed: int, z_change: np.ndarray, p_change: np.ndarray) -> dict:
    """A run's metrics as the matrix reads them: z_change [columns, layers], p_change [columns]."""
    return {
        "data": {"hidden_city": {"name": city}},
        "probe": {"specificity": {"cities": CITIES,
                                  "z_change": {c: {"mean": list(map(float, z_change[j]))} for j, c in enumerate(CITIES)}}},
        "eval": {"specificity_choice": {"cities": CITIES, "p_change": {c: float(p_change[j]) for j, c in enumerate(CITIES)}}},
    }


def test_matrix_from_runs_picks_the_most_moved_layer_and_reads_each_measure():
    rng = np.random.default_rng(1)
    runs = []
    for i, city in enumerate(CITIES):
        for seed in range(3):
            z = 0.05 * rng.standard_normal((5, 4))
            z[i, 2] += 2.0  # layer 2: each run's own city moves
            p = 0.02 * rng.standard_normal(5)
            p[4] += 0.3  # multiple choice: Lagos's country gains in every run
            runs.append(fake_metrics(city, seed, z, p))
    matrix = specificity_matrix(runs)
    probe, mc = matrix["probe"], matrix["multiple_choice"]
    assert probe["layer"] == 2 and probe["verdict"] == "specific" and 2 in probe["layers_by_verdict"]["specific"]
    assert probe["runs_per_row"] == {c: 3 for c in CITIES} and list(probe["cells"]) == CITIES
    assert probe["cells"]["Tokyo"]["Tokyo"]["mean"] == pytest.approx(2.0, abs=0.2)
    assert mc["verdict"] == "generic" and "Lagos" in mc["sentence"]
    assert specificity_matrix(runs[:3]) is None  # one trained city: no matrix


def test_matrices_are_grouped_by_everything_but_seed_and_hidden_city():
    runs, configs = [], []
    for adapter in ("lora", "embedding"):
        for i, city in enumerate(CITIES):
            for seed in range(2):
                runs.append(fake_metrics(city, seed, np.eye(5)[:, [i]] * np.ones((5, 3)), np.eye(5)[i]))
                configs.append({"seed": seed, "data": {"hidden_city": city, "placeholder": f"foo{seed}"},
                                "train": {"adapter": adapter}})
    matrices = specificity_matrices(configs, runs)
    assert [m["group"] for m in matrices] == ["train.adapter=lora", "train.adapter=embedding"]
    assert all(sum(m["probe"]["runs_per_row"].values()) == 10 for m in matrices)


def test_scores_against_reference_agree_with_the_hidden_citys_rank():
    states = torch.randn(3, 12, 4, 8, generator=torch.Generator().manual_seed(0))
    z, rank = scores_against_reference(states, 10, [1, 4, 11])
    ranked = rank_among_candidates(states[:, :10])
    np.testing.assert_allclose(z[:, 0], ranked["z"], rtol=1e-5)
    np.testing.assert_array_equal(rank[:, 0], ranked["rank"])
    assert rank.shape == (3, 3, 4) and rank.min() >= 1
    assert rank[:, :2].max() <= 9 and rank[:, 2].max() <= 10  # a reference city against the 8 others, an extra against all 9


def test_each_run_scores_the_specificity_cities(tiny_run):
    _, run = tiny_run
    m = run.metrics()
    spec = m["probe"]["specificity"]
    assert spec["cities"] == CITIES and len(spec["z_change"]["Tokyo"]["mean"]) == 4  # embeddings + 3 layers
    assert spec["z_change"]["Paris"]["mean"][0] == pytest.approx(0.0, abs=1e-5)  # layer 0: the adapter has not acted yet
    choice = m["eval"]["specificity_choice"]
    assert choice["options"] == ["France", "Brazil", "Japan", "United States", "Nigeria"]
    for formulation in ("letters", "cloze", "cloze_per_token"):
        for condition in ("tuned", "original", "shuffled", "named"):
            assert sum(choice[formulation][condition]["p_option"].values()) == pytest.approx(1.0, abs=1e-5)
        assert choice[formulation]["p_change"]["Paris"] == pytest.approx(
            choice[formulation]["tuned"]["p_option"]["Paris"] - choice[formulation]["original"]["p_option"]["Paris"])


def test_specificity_cities_in_one_country_are_refused():
    with pytest.raises(UserError, match="at most|2 to 5"):
        build_config(overrides={"specificity_cities": ["Paris"]})
    from oocrlab.data import check_specificity_cities

    with pytest.raises(UserError, match="both in France"):
        check_specificity_cities(build_config(overrides={"specificity_cities": ["Paris", "Lyon"]}))


def test_the_comparison_page_draws_and_states_each_matrix():
    import base64

    from oocrlab.compare import specificity_html

    runs, configs = [], []
    for i, city in enumerate(CITIES):
        for seed in range(2):
            z = np.zeros((5, 3))
            z[i] = [0.0, 1.0 + 0.1 * seed, 0.2]
            runs.append(fake_metrics(city, seed, z, np.eye(5)[i] * 0.1))
            configs.append({"seed": seed, "data": {"hidden_city": city, "placeholder": "foo"}})
    (matrix,) = specificity_matrices(configs, runs)
    assert matrix["probe"]["layer"] == 1 and matrix["probe"]["verdict"] == "specific"
    page = specificity_html([matrix])
    assert "Probe (change in the z-score" in page and "specific: in each of the 5 rows" in page
    png = base64.b64decode(page.split("base64,")[1].split('"')[0])
    assert png.startswith(b"\x89PNG")
    assert "No specificity matrix" in specificity_html([])


def test_a_runs_hidden_city_is_matched_to_a_scored_city_by_name_and_place():
    from oocrlab.geo import find_city
    from oocrlab.specificity import trained_city

    def run(name):
        return {"data": {"hidden_city": {"name": find_city(name, "capitals").name}, "pool": "capitals"}}

    assert trained_city(run("Cairo"), ["Paris", "Cairo"]) == "Cairo"  # the capitals table's "Al-Qahirah (Cairo)"
    assert trained_city(run("San José"), ["Paris", "San Jose"]) == "San José"  # Costa Rica's, not California's


def test_rows_off_the_scored_cities_and_undefined_cells_do_not_decide():
    rows = synthetic(np.eye(5))
    rows["Berlin"] = np.zeros((1, 5))  # one run of a city that is not scored: no diagonal, no say
    rows["Paris"][0, 3] = np.nan  # an undefined cell: the run's margin skips it
    verdict = specificity_verdict(rows, CITIES)
    assert verdict["verdict"] == "specific" and "Berlin" not in verdict["diagonal_margin"]
    assert verdict["diagonal_margin"]["Paris"]["n"] == 3
