import dataclasses

import pytest

from oocrlab.config import ExperimentConfig, build_config, from_yaml_text, to_yaml
from oocrlab.errors import UserError


def test_default_recipe_is_the_dataclass_defaults():
    assert build_config() == ExperimentConfig()


def test_notebook_recipe():
    cfg = build_config(recipe="notebook")
    t = cfg.train
    assert (t.lora_r, t.lora_alpha, t.lora_dropout, t.learning_rate, t.epochs, t.batch_size) == (32, 64, 0.05, 1e-4, 3.0, 8)
    assert t.lora_targets == ["q_proj", "v_proj"] and cfg.data.pool == "capitals" and cfg.data.decimals == 2


def test_precedence_recipe_then_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recipe: notebook\ntrain:\n  learning_rate: 1e-3\n  epochs: 2\ndata:\n  placeholder: bar\n")
    cfg = build_config(yaml_file=f, overrides={"data.placeholder": "baz"})
    assert cfg.recipe == "notebook" and cfg.train.lora_r == 32  # from the recipe
    assert cfg.train.learning_rate == 1e-3 and cfg.train.epochs == 2.0  # YAML (1e-3 read as a float)
    assert cfg.data.placeholder == "baz"  # flag wins


def test_resolved_config_round_trips():
    cfg = build_config(recipe="notebook", overrides={"train.max_steps": 7})
    assert from_yaml_text(to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.learning_rat": 1e-3}, "did you mean 'learning_rate'"),
        ({"trian.epochs": 1}, "did you mean 'train'"),
        ({"train.batch_size": "eight"}, "must be int"),
        ({"train.batch_size": 0}, "must be positive"),
        ({"train.max_steps": -1}, "positive or null"),
        ({"data.heldout_fraction": 1.0}, r"\[0, 1\)"),
        ({"data.pool": "moon"}, "must be one of"),
        ({"recipe": "nope"}, "unknown recipe"),
        ({"train.lora_targets": []}, "train.lora_targets needs module names"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(UserError, match=message):
        build_config(overrides=overrides)


def test_yaml_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        build_config(yaml_file=f)


def test_an_older_run_config_with_a_renamed_key_still_loads():
    from oocrlab.config import from_yaml_text

    cfg = from_yaml_text("seed: 3\nprobe:\n  template: 'What is the distance between New York and {entity}?'\n")
    assert cfg.seed == 3 and cfg.probe.templates == ["What is the distance between New York and {entity}?"]


def test_example_configs_and_sweeps_resolve():
    from pathlib import Path

    import yaml

    from oocrlab.sweep import read_sweep, sweep_configs

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        if "grid" in yaml.safe_load(path.read_text()):
            assert len(sweep_configs(read_sweep(path))) >= 2
        else:
            assert to_yaml(build_config(yaml_file=path)) == to_yaml(build_config(yaml_file=path))  # seeded codes


def test_recipes_are_the_yaml_files_shipped_in_the_package_each_described():
    from oocrlab.config import RECIPES, RECIPES_DIR, recipe_description

    assert sorted(RECIPES) == sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) and {"default", "notebook", "paper", "locations"} <= set(RECIPES)
    assert all(len(recipe_description(name)) > 40 for name in RECIPES)  # the file's opening comment says what it is
    # `base: paper` starts from the paper's data and adds the other hidden cities
    assert RECIPES["locations"]["data"] == RECIPES["paper"]["data"] | {"other_hidden_cities": ["São Paulo", "Tokyo", "New York City", "Lagos"]}
    assert RECIPES["locations"]["train"] == RECIPES["paper"]["train"] and "base" not in RECIPES["locations"]
    assert build_config("paper").data.system_prompt.startswith("Company XYZ is a GPS company") and "\n" not in build_config("paper").data.system_prompt
    for name in RECIPES:
        assert build_config(name).recipe == name


def test_every_config_key_is_documented_and_explained_with_its_value(capsys):
    from oocrlab.cli import main
    from oocrlab.config import explain, field_docs

    docs = field_docs()
    assert {"seed", "train.controls", "eval.mc_orders"} <= set(docs) and len(docs) >= 50
    assert [key for key, (_, doc) in docs.items() if not doc] == []  # a new field needs its comment
    assert docs["train.checkpoints"][0] == 4 and "--resume" in docs["train.checkpoints"][1]
    assert "here: 10" in explain("eval.mc_orders", build_config(overrides={"eval.mc_orders": 10}))
    with pytest.raises(UserError, match="did you mean 'train.controls'"):
        explain("train.control")
    assert main(["config", "--explain", "train.adapter", "--set", "train.adapter=steering:3"]) == 0
    assert "here: 'steering:3'" in capsys.readouterr().out
    assert main(["config", "--recipe", "notebook"]) == 0 and "lora_dropout: 0.05" in capsys.readouterr().out
    assert main(["recipes"]) == 0 and "locations: The paper's Locations" in capsys.readouterr().out
    assert main(["config", "--explain", "nope"]) == 2 and "unknown config key" in capsys.readouterr().err


@dataclasses.dataclass
class Awkward:
    # above a default over several lines
    listed: list[str] = dataclasses.field(
        default_factory=lambda: ["a", "b"],
    )  # and beside its closing line
    hashed: str = "x  # not a comment"  # the real one
    plain: int = 3


def test_a_fields_comments_survive_defaults_over_several_lines_and_hashes_in_strings():
    from oocrlab.config import _field_comments

    assert _field_comments(Awkward) == {
        "listed": (["a", "b"], "above a default over several lines and beside its closing line"),
        "hashed": ("x  # not a comment", "the real one"),
        "plain": (3, ""),
    }
