"""Every stage of a whole tiny run on top of a steering adapter (oocrlab.adapters). What the adapters change and
leave alone: tests/unit/test_adapters.py."""

from oocrlab import STAGES, run_stage
from tests.helpers import trained_run


def test_every_stage_runs_on_a_steering_adapter(tmp_path_factory, tiny_model_dir):
    cfg, run, models = trained_run(tmp_path_factory, tiny_model_dir, "steering:1", **{"train.trajectory": [0, 2]})
    for stage in STAGES[2:]:
        run_stage(stage, cfg, run, models)
    assert run.finished_stages() == list(STAGES)
    probe = run.metrics()["probe"]
    assert probe["steering"]["pc1_share"][0] is None and probe["steering"]["pc1_share"][2] is not None  # no shift before layer 1
    assert "a steering vector at the placeholder entering decoder layer 1" in run.report_file.read_text()
    # the snapshots of a steering vector (a zero vector at step 0: the original model) loaded beside it and removed
    points = run.metrics()["trajectory"]["by_adapter"]["tuned"]["points"]
    assert [p["step"] for p in points] == [0, 2, 4] and points[0]["z_change_by_layer"]["hidden"]["mean"] == [0.0] * 4
    assert list(models.model.adapters) == ["default", "shuffled"]
