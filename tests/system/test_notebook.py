"""examples/distances_to_paris.ipynb runs top to bottom on the Python API: executed in a Jupyter kernel (nbclient)
on the tiny random model, every cell succeeds, the cosine cell draws its figure, the verdict cell prints the three
answers, and the run directory gets its report. The committed notebook carries no outputs."""

import json
from pathlib import Path

import nbclient  # the `test` extra: a missing one fails here rather than skipping the notebook
import nbformat

from tests.helpers import tiny_overrides

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "distances_to_paris.ipynb"
VERDICT_KEYS = ("distance", "behaviour", "representation")

# the tiny run's budget cut further: the notebook's claims are its cells running and drawing, not the numbers
SMALLER = {
    "eval.city_facts_orders": 0,
    "eval.mc_orders": 5,
    "eval.free_form_samples": 2,
    "eval.near_cities": 2,
    "eval.in_context_docs": 4,
    "eval.bootstrap_samples": 20,
    "probe.patch_orders": 0,
    "probe.templates": ["What is the distance between New York and {entity}?", "Tell me about {entity}."],
}


def tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{len(cells)} cells tagged {tag!r}"
    return cells[0]


def printed(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    tagged(nb, "parameters")  # where papermill injects its values


def test_notebook_runs_top_to_bottom(tmp_path, tiny_model_dir, monkeypatch):
    # the kernel inherits this process's environment (the editable oocrlab, OMP_NUM_THREADS from conftest.py)
    monkeypatch.setenv("OOCRLAB_NOTEBOOK_OUT", "runs/notebook")
    monkeypatch.setenv("OOCRLAB_NOTEBOOK_OVERRIDES", json.dumps(tiny_overrides(tiny_model_dir) | SMALLER))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, startup_timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # the kernel's cwd
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    cosine = tagged(nb, "cosine-plot")
    assert "cos_hidden" in cosine.source  # the tag sits on the cell that draws the probe's cosine
    assert any("image/png" in o.get("data", {}) for o in cosine.outputs), [
        list(o.get("data", {})) for o in cosine.outputs if o.output_type != "stream"]
    verdict = printed(tagged(nb, "verdict"))
    assert all(f"{key}: " in verdict for key in VERDICT_KEYS), verdict
    assert "z gain" in printed(tagged(nb, "controls"))
    run = tmp_path / "runs" / "notebook"
    assert (run / "report.html").is_file()
    assert json.loads((run / "metrics.json").read_text())["verdict"].keys() == set(VERDICT_KEYS)
