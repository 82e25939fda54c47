"""oocrlab: latent-structure (inductive out-of-context reasoning) experiments on language models.

    from oocrlab import build_config, run_experiment
    cfg = build_config(overrides={"train.max_steps": 5})
    run = run_experiment(cfg, "runs/smoke")
    print(run.metrics()["eval"]["distance"]["tuned"]["mae_km"])  # several hidden cities: ["eval"]["by_city"]["Paris"]...
    print(runs_table(["runs/smoke"]))  # a pandas DataFrame: a row per run and hidden city, every headline number
"""

from oocrlab.answers import parse_km
from oocrlab.config import RECIPES, ExperimentConfig, build_config
from oocrlab.data import build_distance_data
from oocrlab.errors import UserError
from oocrlab.evaluate.distances import evaluate_distances
from oocrlab.experiment import STAGES, Models, run_experiment, run_stage
from oocrlab.generation import generate_greedy
from oocrlab.geo import City, find_city, haversine_km, load_pool
from oocrlab.models import load_model
from oocrlab.packing import last_token_activations, next_token_log_probs
from oocrlab.probe import locate_entity, logit_lens, probe_representations
from oocrlab.report import write_report
from oocrlab.rundir import Run
from oocrlab.sanity import sanity
from oocrlab.table import runs_table
from oocrlab.train import load_adapter, train
from oocrlab.vectors import export_vector, load_vector

__all__ = [
    "ExperimentConfig", "RECIPES", "build_config", "build_distance_data", "UserError", "evaluate_distances",
    "generate_greedy", "parse_km", "sanity", "STAGES", "Models", "run_experiment", "run_stage", "City",
    "find_city", "haversine_km", "load_pool", "load_model", "last_token_activations", "next_token_log_probs", "locate_entity", "logit_lens",
    "probe_representations", "write_report", "Run", "load_adapter", "train", "runs_table", "export_vector", "load_vector",
]
