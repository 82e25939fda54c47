"""Greedy generation, packed (packing.packed_generate): what the sanity questions, the distance evaluation and the
directions read."""

from __future__ import annotations

from tqdm.auto import tqdm

from oocrlab.answers import WITH_UNIT
from oocrlab.chat import prompt_token_ids
from oocrlab.incontext import InContext
from oocrlab.packing import packed_generate


class StopAfterDistance:
    """A packed_generate stopping rule: a row is done once its answer states a distance with a unit and
    one more token follows. parse_km reads the first such match, and text generated after it cannot
    change it, so the parsed distance is the one the full answer would give, at a fraction of the tokens
    (the original model writes a sentence around its number)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, row: int, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return (m := WITH_UNIT.search(text)) is not None and m.end() < len(text.rstrip())


def generate_greedy(
    model, tokenizer, chats: list[list[dict]], max_new_tokens: int, batch_size: int, desc: str,
    prefix: InContext | None = None, stop_after_distance: bool = False,
) -> list[str]:
    """Greedy answers, `batch_size` chats packed into one sequence at a time (packing.packed_generate: no
    padding; a `prefix`'s cached turns are stored and read once). With `stop_after_distance`, an answer
    ends once it has stated a distance (see StopAfterDistance)."""
    prompts = prompt_token_ids(tokenizer, chats, prefix)
    stop = StopAfterDistance(tokenizer) if stop_after_distance else None
    eos = stop_token_ids(model, tokenizer)
    answers: list[str] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        new = packed_generate(model, prompts[i : i + batch_size], max_new_tokens, prefix, eos, stop=stop)
        answers += [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]
    return answers


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer, as generate() reads them: the generation config's, and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return {i for i in [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id] if i is not None}
