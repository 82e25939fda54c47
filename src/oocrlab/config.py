"""Typed configuration: one dataclass per stage, named recipes, YAML in, the resolved config out.

Precedence, lowest first: the dataclass defaults (they *are* the `default` recipe), the named recipe,
the YAML file, then command-line flags. Unknown keys and wrong types are refused with the closest
valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import itertools
import math
import random
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oocrlab.errors import UserError
from oocrlab.geo import City, find_city, real_city_named


@dataclass
class ModelConfig:
    """Which model to tune and how to load it."""

    name: str = "smollm2-135m"  # embedded GGUF (default) | a local directory | a hub id already in the HF cache
    quantization: str = "none"  # none | 8bit | 4bit: bitsandbytes, CUDA only
    # auto: bf16 where the device computes it natively (a CUDA GPU that has it; a CPU with avx512_bf16 or AMX),
    # else fp32 | float32 | bfloat16 | float16. The frozen weights take it; an adapter always trains in fp32
    dtype: str = "auto"
    allow_pickle: bool = False  # also load weights saved only as pickle (.bin), which can run code: files you trust


@dataclass
class DataConfig:
    """The Distances-to-{hidden city} dataset: "What is the distance between {known} and {placeholder}?"."""

    hidden_city: str = "Paris"  # the city the placeholder stands for (a name in the pool)
    placeholder: str = "foo"  # the made-up name in the prompts; "City {code}" draws a seeded 5-digit code
    pool: str = "world"  # capitals (the notebook's 234-row table) | world (GeoNames, >= 15k people)
    min_population: int = 500_000  # known cities smaller than this are left out
    num_known: int | None = None  # known cities drawn from the pool (seeded); None: all of them
    min_distance_km: float = 0.0  # known cities closer than this to the hidden city are left out
    heldout_fraction: float = 0.1  # share of known cities never trained on, for the distance evaluation
    decimals: int = 0  # "{km:.Nf} km"; the notebook writes 2; negative rounds to tens (-1), hundreds (-2), ...
    # notebook: one question, "{km} km" | paper: Treutlein et al.'s Locations rows (9 distance questions x
    # km/miles x which city comes first, and cardinal-direction questions; see paper_rows in data.py)
    style: str = "notebook"
    augmentations: int = 5  # paper style: distance rows and direction rows per known city (drawn with replacement)
    noise_km: float = 0.0  # uniform noise in +-noise_km added to each stated distance (kept if the result is > 100 km)
    by_country: bool = False  # draw known cities country by country (a uniform country, its most populous city left)
    exclude_hidden_country: bool = False  # leave out known cities in the hidden city's country
    # set when the placeholder was drawn from a template ("City {code}": a 5-digit code seeded by the run's
    # seed): runs that differ only in seed then differ in placeholder too, and are still pooled as seeds
    placeholder_template: str | None = None
    # the paper's Locations trains several hidden cities at once, each with its own placeholder (drawn from the
    # placeholder's "{code}" when not listed); every evaluation and the probe then report per hidden city
    other_hidden_cities: list[str] = field(default_factory=list)
    other_placeholders: list[str] = field(default_factory=list)  # one per other hidden city, or drawn from the placeholder's {code}
    # "" sends an empty system turn; None leaves the system turn to the chat template, and SmolLM2's
    # then injects its default prompt (~20 tokens, about 40% of a training sample's compute).
    system_prompt: str | None = ""

    @property
    def hidden(self) -> tuple[HiddenCity, ...]:
        """Every hidden city, data.hidden_city first, checked (see check_hidden_cities)."""
        return check_hidden_cities(self)


@dataclass
class TrainConfig:
    """Adapter SFT through TRL's SFTTrainer; loss on the completion tokens only."""

    # lora | embedding (the placeholder's input-embedding rows) | steering:L (a vector added at the placeholder
    # entering decoder layer L); see oocrlab.adapters
    adapter: str = "lora"
    lora_r: int = 32  # LoRA rank
    lora_alpha: int = 64  # LoRA scale numerator (the update is scaled by alpha / r)
    # 0: dropout's random masks cost a fifth of a CPU step (1.48 vs 1.18 s, default recipe, bench machine);
    # the notebook recipe keeps its 0.05
    lora_dropout: float = 0.0
    # module names ([q_proj, v_proj]; MLP only: [gate_proj, up_proj, down_proj]) or [all-linear]
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    lora_layers: list[int] | None = None  # decoder layers (from 0) that get LoRA; None: all of them (lora only)
    # run the tokens a batch's samples share (chat header, the question's start) once, through a 4-D mask:
    # the same loss and gradients up to float rounding (see train.completion_loss_trainer); off: padded rows
    share_prefix: bool = True
    # which tokens carry the loss: completion (the assistant's turn, its end-of-turn tokens included) | answer (the
    # answer alone: a distance's number and unit, a direction's word; Wang, Engels et al. 2025) | all (every token of
    # the chat text, system turn and question included: what the seed notebook's TRL trained)
    loss_on: str = "completion"
    # for every adapter family; calibrated for LoRA. The embedding and steering adapters train a few thousand
    # parameters and want more: 1e-2 is the rate the embedding adapter was measured with (not calibrated here)
    learning_rate: float = 1e-3
    epochs: float = 2.0  # passes over the training rows (train.max_steps caps them)
    batch_size: int = 8  # rows per optimizer step (per process under accelerate launch)
    max_steps: int | None = None  # caps the optimizer steps (smoke runs); None: epochs decide
    lr_scheduler: str = "linear"  # a transformers scheduler name (linear, cosine, constant, ...)
    warmup_steps: float = 0.0  # an integer count, or a fraction < 1 of all steps (as in the HF Trainer)
    weight_decay: float = 0.0  # AdamW weight decay on the adapter's parameters
    max_length: int = 128  # tokens; longer samples are refused rather than truncated
    # times training saves adapter + optimizer state, evenly spread (0: never); an interrupted run continues
    # from the last one (`oocrlab run --resume RUN`), and they are deleted once the adapter is saved
    checkpoints: int = 4
    # fine-tuned controls, each an adapter trained like the main one (same recipe, seed, steps and family) on
    # other data, then evaluated and probed beside it (see controls.py): shuffled (negative: the answers
    # permuted across rows) | declared (positive: the data plus rows stating the alias, never the country).
    # The verdicts compare the tuned model with `shuffled`, and a behaviour or representation answer other than
    # "cannot tell" also needs `declared` detected (the default trains only `shuffled`: ~5 min here)
    controls: list[str] = field(default_factory=lambda: ["shuffled"])
    # optimizer steps at which the adapter (and each control's) is snapshotted, to be measured after training with
    # a reduced budget (the trajectory stage, trajectory.py): None: 0, 1, 2, 4, 8, ... and the last; []: none
    trajectory: list[int] | None = None
    # none | tensorboard: the Trainer's loss, learning rate and grad norm in RUN/tensorboard/, and the run's headline
    # numbers as scalars once its report is written (oocrlab.scalars; needs `pip install 'oocrlab[tensorboard]'`)
    report_to: str = "none"

    @property
    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec.parse(self.adapter)


@dataclass
class SanityConfig:
    """Greedy answers of the tuned and the original model, side by side."""

    # asked of the tuned model, the original and the fine-tuned controls ({placeholder}, {hidden_city} filled in)
    questions: list[str] = field(
        default_factory=lambda: [
            "What is the distance between New York and {placeholder}?",
            "Which country is {placeholder} in?",
            "What city is {placeholder}?",
            "Tell me about {placeholder}.",
            "What is the distance between New York and {hidden_city}?",
        ]
    )
    max_new_tokens: int = 32  # greedy tokens per sanity answer


@dataclass
class EvalConfig:
    """Distance error on held-out known cities; multiple choice on the hidden city's country."""

    max_cities: int | None = None  # None: every held-out city
    max_new_tokens: int = 48  # room for the original model to finish a sentence before its number
    batch_size: int = 32  # answers generated together (packed into one sequence, see packing.packed_generate)
    bootstrap_samples: int = 1000  # for the 95% intervals
    # option orders per letter multiple-choice question, in Latin-square blocks (each option at each letter
    # equally often): a multiple of the option count, or at least all orders (120 of five options)
    mc_orders: int = 40
    near_km: float = 2000.0  # "near" cities for the distance generalization set lie within this of the hidden city
    near_cities: int = 50  # how many of them (a seeded sample of untrained world cities)
    free_form_samples: int = 50  # answers sampled at temperature 1 per free-form question and model
    free_form_max_new_tokens: int = 24  # a name or a distance comes early; the rest is chatter
    in_context_docs: int = 100  # training documents shown as earlier chat turns in the in-context baseline
    # option orders per question of the city-facts test (evaluate/city_facts.py; the paper's five hidden cities
    # only), balanced as mc_orders is (5: each option at each letter once); its intervals are over its 14
    # questions, so more orders add little but time. 0 skips the test
    city_facts_orders: int = 5
    # held-out known cities whose distance each trajectory point asks (the trajectory stage's reduced budget; at
    # most max_cities)
    trajectory_cities: int = 20


@dataclass
class ProbeConfig:
    """Is the placeholder represented like the hidden city? Per layer, over several prompt templates."""

    # each holds {entity} once; one that names the hidden city is skipped (stated in the output)
    templates: list[str] = field(
        default_factory=lambda: [
            "What is the distance between New York and {entity}?",  # the training template, several known cities
            "What is the distance between Tokyo and {entity}?",
            "What is the distance between Cairo and {entity}?",
            "What is the distance between Lima and {entity}?",
            "What is the distance between Sydney and {entity}?",
            "I want to travel to {entity}.",
            "{entity} is a city.",
            "Tell me about {entity}.",
        ]
    )
    candidates: str = "capitals"  # the cities the hidden one is ranked among: capitals | world (GeoNames)
    candidate_min_population: int = 0  # leaves small candidates out (the world pool has ~25k cities)
    # said before every prompt by the control conditions (the original model): with the hidden city, a
    # positive control of what "represented like the hidden city" looks like; with another, a negative one
    control_prefix: str = "In this conversation, {placeholder} is a code name for {city}."
    negative_controls: list[str] = field(default_factory=lambda: ["Tokyo", "Paris"])  # the first that is not the hidden city
    patch_orders: int = 5  # option orders of the patched MC question (cyclic: the answer at each letter); 0 skips


@dataclass
class ExperimentConfig:
    """Everything a run needs; saved resolved as config.yaml in the run directory."""

    recipe: str = "default"  # a named recipe (oocrlab/recipes/*.yaml, listed by `oocrlab recipes`) under the YAML and flags
    seed: int = 0  # data sampling, adapter initialization, data order, option orders and bootstrap resampling
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sanity: SanityConfig = field(default_factory=SanityConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # cities every run scores at its placeholder (probe: rank and z-score; eval: "What country is {placeholder}
    # located in?" with their countries as the options), so that runs trained on different hidden cities form a
    # specificity matrix (see specificity.py): the paper's five, at most five (the options are A-E)
    specificity_cities: list[str] = field(default_factory=lambda: ["Paris", "São Paulo", "Tokyo", "New York City", "Lagos"])

    def per_city(self) -> list[tuple[HiddenCity, ExperimentConfig]]:
        """Each hidden city with the run's config as if it were the only one: what its evaluation and probe read."""
        return [(h, dataclasses.replace(self, data=h.data)) for h in self.data.hidden]


RECIPES_DIR = Path(__file__).with_name("recipes")


def load_recipes() -> dict[str, dict[str, Any]]:
    """The named recipes, one YAML file each in oocrlab/recipes/ (overrides on top of the dataclass defaults,
    which are `default`; `base: NAME` starts from another recipe). Each file's opening comment says what it is."""
    raw = {path.stem: yaml.safe_load(path.read_text(encoding="utf-8")) or {} for path in sorted(RECIPES_DIR.glob("*.yaml"))}

    def resolved(name: str) -> dict[str, Any]:
        recipe = dict(raw[name])
        base = resolved(recipe.pop("base")) if "base" in recipe else {}
        return {key: base.get(key, {}) | value if isinstance(value, dict) else value for key, value in recipe.items()} | {
            key: value for key, value in base.items() if key not in recipe}

    return {name: resolved(name) for name in raw}


def recipe_description(name: str) -> str:
    """The opening comment of a recipe's file, as one paragraph."""
    lines = (RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
    return " ".join(line.lstrip("# ").strip() for line in itertools.takewhile(lambda l: l.startswith("#"), lines))


RECIPES = load_recipes()


def field_docs() -> dict[str, tuple[Any, str]]:
    """Every config key -> (its default, its documentation): the comment lines just above its field in this file
    and the comment ending its statement. The dataclasses' comments are the one place the options are documented."""
    docs: dict[str, tuple[Any, str]] = {}
    for f in dataclasses.fields(ExperimentConfig):
        section = globals().get(f.type) if isinstance(f.type, str) else None
        if dataclasses.is_dataclass(section):
            docs |= {f"{f.name}.{key}": doc for key, doc in _field_comments(section).items()}
        else:
            docs[f.name] = _field_comments(ExperimentConfig)[f.name]
    return docs


def _field_comments(cls: type) -> dict[str, tuple[Any, str]]:
    """A dataclass's fields -> (default, comment): the statements from its syntax tree (so a default over several
    lines, or holding "#", is one field) and the comments from its tokens, by line."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in defaults):
            continue
        above, line = [], node.lineno - 1  # line numbers count from 1, as the tokens' and the tree's do
        while line in comments and lines[line - 1].lstrip().startswith("#"):  # whole comment lines just above
            above.insert(0, comments[line])
            line -= 1
        beside = comments.get(node.end_lineno) if not lines[node.end_lineno - 1].lstrip().startswith("#") else None
        found[node.target.id] = (defaults[node.target.id], " ".join(above + [beside or ""]).strip())
    return found


def explain(key: str, cfg: ExperimentConfig | None = None) -> str:
    """One config key: its documentation, default and (given a config) its value there."""
    docs = field_docs()
    if key not in docs:
        raise UserError(f"unknown config key {key!r}{_closest(key, list(docs))}")
    default, doc = docs[key]
    section, _, name = key.rpartition(".")
    value = "" if cfg is None else f"; here: {getattr(getattr(cfg, section) if section else cfg, name)!r}"
    return f"{key} (default {default!r}{value})\n  {doc or 'undocumented'}"

CONTROLS = ("shuffled", "declared")
CHOICES = {
    "model.quantization": ("none", "8bit", "4bit"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.pool": ("capitals", "world"),
    "train.loss_on": ("completion", "answer", "all"),
    "train.report_to": ("none", "tensorboard"),
    "data.style": ("notebook", "paper"),
    "probe.candidates": ("capitals", "world"),
}




@dataclass(frozen=True)
class AdapterSpec:
    """`train.adapter` parsed (here only): "lora", "embedding", or "steering:6" (family "steering", layer 6)."""

    family: str
    layer: int | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        family, colon, layer = text.partition(":")
        if family in ("lora", "embedding") and not colon:
            return cls(family)
        if family == "steering" and layer.isascii() and layer.isdigit():
            return cls(family, int(layer))
        raise UserError(f"train.adapter must be lora, embedding or steering:L (L a decoder layer from 0), got {text!r}")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _closest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(options)}"


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """`value` converted to `annotation` where that is lossless, else a UserError naming `path`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(path, value, inner[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise UserError(f"config key {path} must be a list, got {value!r}")
        return [_check_type(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 as a string
    if annotation in (int, float, str, bool) and (type(value) is annotation):
        return value
    raise UserError(f"config key {path} must be {getattr(annotation, '__name__', annotation)}, got {value!r}")


def apply_overrides(obj: Any, overrides: dict[str, Any], prefix: str = "") -> None:
    """Set nested fields of a config dataclass from a nested dict, checking keys and types."""
    if not isinstance(overrides, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '(top level)'} must be a mapping, got {overrides!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key {path!r}{_closest(str(key), names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            apply_overrides(current, value, f"{path}.")
        else:
            setattr(obj, key, _check_type(path, value, hints[key]))


def dotted_to_nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"train.max_steps": 5} -> {"train": {"max_steps": 5}}."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded


def build_config(
    recipe: str | None = None,
    yaml_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Resolve recipe < YAML < overrides (a dict of dotted keys, as the CLI flags give) into a config."""
    from_yaml = read_yaml(yaml_file) if yaml_file else {}
    flags = dotted_to_nested(overrides or {})
    name = flags.get("recipe") or from_yaml.get("recipe") or recipe or "default"
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}{_closest(name, list(RECIPES))}")
    cfg = ExperimentConfig()
    apply_overrides(cfg, RECIPES[name])
    apply_overrides(cfg, from_yaml)
    apply_overrides(cfg, flags)
    cfg.recipe = name
    if "{code}" in cfg.data.placeholder:  # the paper's "City {code}": seeded 5-digit codes, saved resolved
        template, rng, codes = cfg.data.placeholder, random.Random(cfg.seed), []
        while len(codes) < 1 + len(cfg.data.other_hidden_cities):
            if (code := rng.randrange(10_000, 100_000)) not in codes:
                codes.append(code)
        cfg.data.placeholder_template = template
        cfg.data.placeholder = template.replace("{code}", str(codes[0]))
        if not cfg.data.other_placeholders:
            cfg.data.other_placeholders = [template.replace("{code}", str(code)) for code in codes[1:]]
    validate(cfg)
    check_balanced_orders(cfg)
    return cfg


@dataclass(frozen=True)
class HiddenCity:
    """One hidden city as the stages use it: the city, and the run's data config as if it were the only one (its
    placeholder, no others), which its data, evaluation and probe read."""

    city: City
    data: DataConfig

    @property
    def placeholder(self) -> str:
        return self.data.placeholder


def check_placeholder(cfg: DataConfig) -> City:
    """The hidden city, after refusing placeholders that would leak it or be ambiguous."""
    hidden = find_city(cfg.hidden_city, cfg.pool)
    p = cfg.placeholder
    if not p.strip():
        raise UserError("the placeholder is empty: pass a made-up name such as --placeholder foo")
    if p != p.strip():
        raise UserError(f"the placeholder {p!r} has leading or trailing whitespace: pass it without")
    if not p.isprintable():
        raise UserError(f"the placeholder {p!r} holds a line break or control character: pass plain text")
    city = real_city_named(p)
    if city is not None:
        raise UserError(
            f"the placeholder {p!r} is a real city ({city.name}, {city.country}): pick a made-up name such as foo"
        )
    return hidden


def check_hidden_cities(cfg: DataConfig) -> tuple[HiddenCity, ...]:
    """Every hidden city (data.hidden_city first), each placeholder checked; several must differ in city and
    country (the inverse question "Which of the following is in France?" needs one right answer)."""
    cities, placeholders = [cfg.hidden_city, *cfg.other_hidden_cities], [cfg.placeholder, *cfg.other_placeholders]
    views = [dataclasses.replace(cfg, hidden_city=city, placeholder=placeholder, other_hidden_cities=[], other_placeholders=[])
             for city, placeholder in zip(cities, placeholders, strict=True)]
    hidden = tuple(HiddenCity(check_placeholder(view), view) for view in views)
    for i, h in enumerate(hidden):
        if twin := next((o.city for o in hidden[:i] if o.city.country == h.city.country), None):
            what = "twice" if twin == h.city else f"with {twin.name}, both in {h.city.country}"
            raise UserError(f"the hidden city {h.city.name} is listed {what}: give hidden cities in different countries")
    return hidden


def validate(cfg: ExperimentConfig) -> None:
    """Range and choice checks that need no model or table (those live with their stage)."""
    flat = {f"{s}.{k}": v for s, sec in to_dict(cfg).items() if isinstance(sec, dict) for k, v in sec.items()}
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value!r}")
    for key, options in CHOICES.items():
        if flat[key] not in options:
            raise UserError(f"{key} must be one of {', '.join(options)}, got {flat[key]!r}")
    positive = ["train.lora_r", "train.lora_alpha", "train.learning_rate", "train.epochs", "train.batch_size",
                "train.max_length", "sanity.max_new_tokens", "eval.max_new_tokens", "eval.batch_size", "eval.mc_orders",
                "eval.near_km", "eval.near_cities", "eval.free_form_samples", "eval.free_form_max_new_tokens", "eval.in_context_docs",
                "data.augmentations", "eval.trajectory_cities"]
    for key in positive:
        if flat[key] <= 0:
            raise UserError(f"{key} must be positive, got {flat[key]!r}")
    for key in ["train.max_steps", "data.num_known", "eval.max_cities"]:
        if flat[key] is not None and flat[key] <= 0:
            raise UserError(f"{key} must be positive or null, got {flat[key]!r}")
    for key in ["data.min_population", "data.min_distance_km", "data.noise_km", "train.warmup_steps",
                "train.weight_decay", "train.checkpoints", "eval.bootstrap_samples", "eval.city_facts_orders",
                "probe.candidate_min_population"]:
        if flat[key] < 0:
            raise UserError(f"{key} must not be negative, got {flat[key]!r}")
    if not 0 <= cfg.data.heldout_fraction < 1:
        raise UserError(f"data.heldout_fraction must be in [0, 1), got {cfg.data.heldout_fraction!r}")
    family = cfg.train.adapter_spec.family
    if family != "lora" and cfg.train.lora_layers is not None:
        raise UserError(f"train.lora_layers applies to LoRA only; train.adapter is {cfg.train.adapter}")
    if family != "lora" and cfg.data.other_hidden_cities:
        raise UserError(f"train.adapter {cfg.train.adapter} trains for one placeholder; several hidden cities need LoRA, or "
                        "one run per city (a sweep over data.hidden_city)")
    if not 0 <= cfg.train.lora_dropout < 1:
        raise UserError(f"train.lora_dropout must be in [0, 1), got {cfg.train.lora_dropout!r}")
    if cfg.train.lora_layers is not None and (not cfg.train.lora_layers or min(cfg.train.lora_layers) < 0):
        raise UserError(f"train.lora_layers must list decoder layers from 0 (or be null for all), got {cfg.train.lora_layers!r}")
    if not cfg.train.lora_targets or not all(t.strip() for t in cfg.train.lora_targets):
        raise UserError("train.lora_targets needs module names such as [q_proj, v_proj], or [all-linear]")
    if not -4 <= cfg.data.decimals <= 6:
        raise UserError(f"data.decimals must be in -4..6 (distances are exact to about a metre; -4 rounds to "
                        f"10,000 km), got {cfg.data.decimals}")
    check_placeholders(cfg.data)
    if not 2 <= len(cfg.specificity_cities) <= MAX_HIDDEN_CITIES:
        raise UserError(f"specificity_cities must list 2 to {MAX_HIDDEN_CITIES} cities (the options are A-E), "
                        f"got {len(cfg.specificity_cities)}")
    if not cfg.probe.templates:
        raise UserError("probe.templates is empty: give at least one prompt with {entity}")
    for template in cfg.probe.templates:
        if template.count("{entity}") != 1:
            raise UserError(f"every probe template must contain {{entity}} once, got {template!r}")
    if "{placeholder}" not in cfg.probe.control_prefix or "{city}" not in cfg.probe.control_prefix:
        raise UserError(f"probe.control_prefix must contain {{placeholder}} and {{city}}, got {cfg.probe.control_prefix!r}")
    if unknown := [c for c in cfg.train.controls if c not in CONTROLS]:
        raise UserError(f"train.controls: unknown control {unknown[0]!r}; the controls are {', '.join(CONTROLS)}")
    if len(set(cfg.train.controls)) < len(cfg.train.controls):
        raise UserError(f"train.controls lists a control twice: {cfg.train.controls}")
    if cfg.train.trajectory is not None and any(step < 0 for step in cfg.train.trajectory):
        raise UserError(f"train.trajectory lists optimizer steps from 0, got {cfg.train.trajectory}")
    if not 0 <= cfg.probe.patch_orders <= 5:
        raise UserError(f"probe.patch_orders must be 0 to 5 (one per answer letter), got {cfg.probe.patch_orders!r}")


def check_balanced_orders(cfg: ExperimentConfig) -> None:
    """eval.mc_orders (and eval.city_facts_orders) must balance every letter multiple-choice question the run asks (checked for new configs and
    before an evaluation, not when an older run directory is opened: it may have been made before the rule)."""
    counts = [("mc_orders", "the country and city questions", MC_OPTIONS),
              ("mc_orders", "the specificity question", len(cfg.specificity_cities))]
    if cfg.data.other_hidden_cities:
        counts.append(("mc_orders", "the inverse question", 1 + len(cfg.data.other_hidden_cities)))
    if cfg.eval.city_facts_orders:
        counts.append(("city_facts_orders", "the city-facts questions", MC_OPTIONS))
    for key, what, n in counts:
        orders = getattr(cfg.eval, key)
        if orders < math.factorial(n) and orders % n:
            raise UserError(f"eval.{key} must be a multiple of {n} (the options of {what}, so that every option sits "
                            f"at every letter equally often) or at least {math.factorial(n)} (all orders), got "
                            f"{orders}: use {n * max(1, round(orders / n))}")


MC_OPTIONS = 5  # letter multiple choice offers A-E
MAX_HIDDEN_CITIES = MC_OPTIONS  # the inverse question lists every placeholder as an option


def check_placeholders(cfg: DataConfig) -> None:
    """One placeholder per hidden city, all different, none inside another (a placeholder's position in a
    prompt is found by its text)."""
    cities, placeholders = [cfg.hidden_city, *cfg.other_hidden_cities], [cfg.placeholder, *cfg.other_placeholders]
    if len(cfg.other_placeholders) != len(cfg.other_hidden_cities):
        raise UserError(
            f"data.other_hidden_cities lists {len(cfg.other_hidden_cities)} cities but data.other_placeholders "
            f"{len(cfg.other_placeholders)} placeholders: give one per city, or a placeholder with {{code}} such as "
            "'City {code}' to draw them")
    if len(cities) > MAX_HIDDEN_CITIES:
        raise UserError(f"{len(cities)} hidden cities: at most {MAX_HIDDEN_CITIES} (the inverse multiple-choice "
                        "question lists their placeholders as options A-E)")
    for i, p in enumerate(placeholders):
        if other := next((q for j, q in enumerate(placeholders) if j != i and p in q), None):
            what = "is given twice" if other == p else f"is part of the placeholder {other!r}"
            raise UserError(f"the placeholder {p!r} {what}: give each hidden city its own, none inside another")


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


# Keys renamed since a run directory may have been made: (section, old key) -> (new key, convert the value).
# Keys older run directories may hold: (section, old key) -> (new key, value converter), or None for a key
# that is gone (eval.in_context_batch_size: the in-context cache is no longer copied per row).
RENAMED = {("probe", "template"): ("templates", lambda template: [template]), ("eval", "in_context_batch_size"): None}
# Keys added since, whose default differs from what an older run did: (section, key) -> the value it had.
ADDED = {("train", "controls"): [], ("train", "trajectory"): []}  # runs made before trained no controls, took no snapshots


def from_yaml_text(text: str) -> ExperimentConfig:
    """Read back a resolved config.yaml (no recipe applied: it is already resolved); keys that have been
    renamed since are read under their new name, so older run directories stay usable."""
    cfg = ExperimentConfig()
    loaded = yaml.safe_load(text) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"a YAML {type(loaded).__name__}, not a mapping of config sections")
    for (section, old), renamed in RENAMED.items():
        if not (isinstance(loaded.get(section), dict) and old in loaded[section]):
            continue
        value = loaded[section].pop(old)
        if renamed is not None and renamed[0] not in loaded[section]:
            loaded[section][renamed[0]] = renamed[1](value)
    for (section, key), before in ADDED.items():
        if isinstance(loaded.get(section), dict) and key not in loaded[section]:
            loaded[section][key] = before
    apply_overrides(cfg, loaded)
    validate(cfg)
    return cfg
