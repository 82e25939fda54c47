"""Interruption: a checkpoint killed while saving is never resumed from. Whole runs killed and resumed (a
SIGKILL'd subprocess, an unrecorded stage) are in tests/system/test_resume_runs.py."""

import pytest

from oocrlab.train import checkpoints, last_checkpoint


@pytest.mark.parametrize("damage", ["missing state", "truncated state"])
def test_a_checkpoint_killed_while_saving_is_never_resumed_from(tmp_path, damage):
    for step in (50, 100, 150):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text('{"global_step": %d}' % step)
    state = tmp_path / "checkpoint-150" / "trainer_state.json"
    state.unlink() if damage == "missing state" else state.write_text('{"global_st')
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-100"  # by step number, not name order
    assert checkpoints(tmp_path)[1] == [tmp_path / "checkpoint-150"]
