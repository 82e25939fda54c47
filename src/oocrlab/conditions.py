"""The conditions every measurement is taken under, side by side (each number in metrics.json carries its
condition's name):

| condition | model | prompt |
|---|---|---|
| tuned | the adapter on | the placeholder |
| original | every adapter off (`disable_adapter()`, the same object) | the placeholder |
| in_context | original | training documents as earlier chat turns, then the question |
| shuffled, declared | a fine-tuned control's adapter alone on (`train.controls`, see controls.py) | the placeholder |
| named | original | the hidden city's name in place of the placeholder: the ceiling, whether the question can be answered at this scale |
"""

from __future__ import annotations

from oocrlab.chat import user_prompt
from oocrlab.config import ExperimentConfig
from oocrlab.geo import City
from oocrlab.incontext import InContext


def conditions(cfg: ExperimentConfig, in_context: bool = True, named: bool = False) -> tuple[str, ...]:
    """The conditions of an evaluation, in the order they are reported."""
    return ("tuned", "original", *(("in_context",) if in_context else ()), *cfg.train.controls, *(("named",) if named else ()))


def model_state(condition: str) -> str:
    """The adapter state a condition runs under (models.with_condition): the prompt-only conditions are the original model."""
    return "original" if condition in ("in_context", "named") else condition


def entity(cfg: ExperimentConfig, condition: str, hidden: City) -> str:
    """What the question calls the city: the placeholder, or under `named` the hidden city's own name."""
    return hidden.plain_name if condition == "named" else cfg.data.placeholder


def ask(cfg: ExperimentConfig, template: str, condition: str, hidden: City) -> str:
    """A question template ("... {placeholder} ...") as the condition asks it."""
    return template.replace("{placeholder}", entity(cfg, condition, hidden))


def chat_for(cfg: ExperimentConfig, question: str, condition: str, in_context: InContext | None) -> list[dict]:
    if condition == "in_context":
        return in_context.chat(question)
    return user_prompt(question, cfg.data.system_prompt)


def prefix_for(condition: str, in_context: InContext | None) -> InContext | None:
    """The cached turns a condition continues from: the in-context baseline's, none for the others."""
    return in_context if condition == "in_context" else None
