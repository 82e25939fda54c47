"""Adapter families besides LoRA (`train.adapter`, `--adapter`), each a few parameters on the frozen model:

- `embedding`: the input-embedding rows of the placeholder's tokens (those found at the placeholder in the
  training prompts). Every occurrence of such a token reads its trained row, so a placeholder whose tokens
  the training data also uses elsewhere ("City 60494": " City" and digits, in answers and city names) is
  refused (see attach_adapter). The LM head is not touched,
  even where it is tied to the embedding (PEFT's TrainableTokens would tie the trained rows into the LM
  head as well, moving those tokens' output logits, and rebuilds the whole matrix on every forward).
- `steering:L`: one vector added to the residual stream entering decoder layer L (what transformers
  returns as hidden state L; 0 = the embeddings) at every token of every occurrence of the placeholder,
  as in the tokenwise steering of Wang, Engels et al. 2025's code. Starts at zero.

Both wrap the model as a PeftModel does (attributes fall through to it, `disable_adapter()` gives the
original model, `save_pretrained` writes only the adapter) and act through forward hooks, so the model's
own modules and weights stay as they are and no matmul is added.

Placeholder positions are found in each forward call's input_ids (the tokens of " foo" or "foo"), not
passed in from outside: training batches, packed rows, generation and the probe all reach the model
through its forward, and a hook sees nothing else. A token continues an occurrence only if the token
before it in its own text is in the same call (see `placeholder_mask`), so tokens generated one at a
time are steered when they alone are the placeholder (one token), not when they complete a longer one.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from oocrlab.config import AdapterSpec
from oocrlab.errors import UserError
from oocrlab.hooks import Hooks
from oocrlab.rundir import rewrite_command

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"  # PEFT's names: every adapter/ looks alike
FAMILY_KEY = "oocrlab_adapter"  # in CONFIG_FILE: names the family; PEFT's configs have none


def placeholder_sequences(tokenizer, placeholder: str) -> list[list[int]]:
    """The placeholder's tokens mid-sentence (after a space) and at the start of a text, as the tokenizer writes them."""
    variants = (tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (" " + placeholder, placeholder))
    return [list(v) for v in dict.fromkeys(variants)]


def placeholder_mask(input_ids: torch.Tensor, sequences: list[list[int]], attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] true at every token of every occurrence of one of `sequences` in input_ids [B, S].

    An occurrence is followed along its own text: a token's predecessor is the token of the same call that
    it may attend to (a 4-D mask says which; without one, every earlier token) one position before it.
    In a plain row that is the token before it; in a packed prefix-tree row (packing.py) its parent in the
    tree, even where another prompt's tokens lie between them; in a packed generation step (one new token
    per prompt, their predecessors in the cache) none. So no occurrence is matched across two prompts."""
    b, s = input_ids.shape
    device = input_ids.device
    positions = (torch.arange(s, device=device) if position_ids is None else position_ids).expand(b, s)
    if attention_mask is not None and attention_mask.dim() == 4:  # [B, 1, S, cached + S]: this call's tokens come last
        keys = attention_mask[:, 0, :, -s:]
        sees = keys if keys.dtype == torch.bool else keys == 0
    else:
        sees = torch.ones(s, s, dtype=torch.bool, device=device).tril().expand(b, s, s)
    before = torch.ones(s, s, dtype=torch.bool, device=device).tril(-1)
    is_predecessor = sees & before & (positions[:, None, :] == positions[:, :, None] - 1)  # [B, token, candidate]
    predecessor = torch.where(is_predecessor, torch.arange(s, device=device), -1).amax(-1)  # -1: none in this call
    hits = torch.zeros(b, s, dtype=torch.long, device=device)
    for sequence in sequences:
        at = torch.arange(s, device=device).expand(b, s)  # each token as an occurrence's last
        found = input_ids == sequence[-1]
        chain = [at]
        for token in reversed(sequence[:-1]):
            at = torch.where(at >= 0, predecessor.gather(1, at.clamp(min=0)), -1)
            found = found & (at >= 0) & (input_ids.gather(1, at.clamp(min=0)) == token)
            chain.append(at)
        for at in chain:
            hits.scatter_add_(1, at.clamp(min=0), found.long())
    return hits > 0


class HookAdapter(torch.nn.Module):
    """The frozen model and a few trained parameters acting on it through forward hooks, outwardly a
    PeftModel: attributes fall through to the model, `disable_adapter()` gives the original model (the
    hooks then change nothing) and `save_pretrained` writes the adapter alone. Subclasses name their
    `family` and register their parameters and hooks."""

    family: str
    # transformers' Trainer refuses to train a quantized model without trainable adapters: this one has them
    _hf_peft_config_loaded = True

    def __init__(self, model):
        super().__init__()
        self.frozen_model = model  # its dtype and device are the adapter's (`model.dtype`), whatever the parameters'
        model.requires_grad_(False)
        # Several adapters may act on one model (a run's controls beside it, see load_adapter): they share one
        # switch naming the adapter whose hooks act, None for none (the original model).
        self.name, self.switch = "default", {"active": "default"}
        self.adapters = {"default": self}  # a plain dict: the others are not submodules (their weights are not saved)
        self.hooks = Hooks()  # on the frozen model's modules: removed by close()

    @property
    def enabled(self) -> bool:
        return self.switch["active"] == self.name

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "frozen_model":  # not set yet: no recursion
                raise
            return getattr(self.frozen_model, name)

    def forward(self, *args, **kwargs):
        return self.frozen_model(*args, **kwargs)

    def get_base_model(self):
        return self.frozen_model

    @contextlib.contextmanager
    def disable_adapter(self):
        active, self.switch["active"] = self.switch["active"], None
        try:
            yield
        finally:
            self.switch["active"] = active  # as it was: a nested disable leaves the outer one in force

    # PEFT's names for several adapters on one model, so that models.with_condition switches either kind
    def load_adapter(self, directory: str | Path, adapter_name: str) -> None:
        """Another saved adapter of this module's families on the same model, acting only once selected."""
        other = load_hook_adapter(self.frozen_model, Path(directory))
        other.name, other.switch = adapter_name, self.switch
        self.adapters[adapter_name] = other

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter load_adapter added, and its hooks."""
        self.adapters.pop(adapter_name).hooks.close()

    def set_adapter(self, adapter_name: str | None) -> None:
        """Select the adapter whose hooks act; None: none (as under disable_adapter, which may have been active)."""
        if adapter_name is not None and adapter_name not in self.adapters:
            raise ValueError(f"no adapter named {adapter_name!r}; loaded: {', '.join(self.adapters)}")
        self.switch["active"] = adapter_name

    @property
    def active_adapter(self) -> str | None:
        return self.switch["active"]

    def close(self) -> None:
        """Remove every hook this adapter and the others on its model put there: the frozen model is the original again."""
        for adapter in self.adapters.values():
            adapter.hooks.close()

    def arguments(self) -> dict:
        """What the constructor needs besides the model and the weights (saved in CONFIG_FILE)."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({name: p.detach().cpu().contiguous() for name, p in self.named_parameters(recurse=False)}, directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps({FAMILY_KEY: self.family, **self.arguments()}), encoding="utf-8")

    def load_weights(self, directory: Path) -> None:
        """Copy saved weights into this adapter's parameters, in place (an optimizer holding them keeps them)."""
        saved = load_file(directory / WEIGHTS_FILE)
        own = dict(self.named_parameters(recurse=False))
        if saved.keys() != own.keys() or any(saved[n].shape != p.shape for n, p in own.items()):
            raise UserError(f"the {self.family} adapter in {directory} does not fit this model: retrain it with "
                            f"`{rewrite_command(directory)}`")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(saved[name])


class EmbeddingRows(HookAdapter):
    """Trained input-embedding rows for some tokens (float32, as PEFT keeps adapter weights), read instead of
    the model's wherever those tokens are input; the model's embedding and LM head are never changed."""

    family = "embedding"

    def __init__(self, model, token_ids: list[int]):
        super().__init__(model)
        embedding = model.get_input_embeddings()
        ids = torch.tensor(token_ids, device=embedding.weight.device)
        if len(ids) == 0 or ids.min() < 0 or ids.max() >= embedding.num_embeddings:
            raise UserError(f"the embedding adapter's tokens {token_ids} are not in this model's vocabulary of {embedding.num_embeddings}")
        self.token_ids = token_ids
        with torch.no_grad():  # the embedding's output, so a scaled embedding (Gemma) stays scaled
            self.rows = torch.nn.Parameter(embedding(ids).float())
        slot = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=ids.device)
        slot[ids] = torch.arange(len(ids), device=ids.device)
        self.register_buffer("slot", slot, persistent=False)  # token id -> its row, -1 for the others
        self.hooks.after(embedding, self.replace_rows)

    def replace_rows(self, module, args, output):
        if not self.enabled:
            return None
        slot = self.slot[args[0]]
        return torch.where((slot >= 0)[..., None], self.rows.to(output.dtype)[slot.clamp(min=0)], output)

    def arguments(self) -> dict:
        return {"token_ids": self.token_ids}


class SteeringVector(HookAdapter):
    """A trained vector (float32, from zero) added to the residual stream entering decoder layer `layer` at
    the placeholder's tokens (`sequences`: its token ids in each tokenization)."""

    family = "steering"

    def __init__(self, model, layer: int, sequences: list[list[int]]):
        super().__init__(model)
        decoder = model.get_decoder()
        if not 0 <= layer < len(decoder.layers):
            raise UserError(f"steering:{layer} asks for decoder layer {layer}, but the model has layers 0-{len(decoder.layers) - 1}")
        self.layer, self.sequences = layer, sequences
        embedding = model.get_input_embeddings()
        self.vector = torch.nn.Parameter(torch.zeros(embedding.embedding_dim, device=embedding.weight.device))
        self.at_placeholder: torch.Tensor | None = None  # [B, S] of the forward call under way
        self.hooks.before(decoder, self.find_placeholder)
        # the module whose output enters layer L; ahead of transformers' own hooks that record hidden states,
        # so hidden state L includes the vector
        self.hooks.after([embedding, *decoder.layers][layer], self.steer, prepend=True)

    def find_placeholder(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self.enabled and input_ids is not None:
            self.at_placeholder = placeholder_mask(input_ids, self.sequences, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        else:
            self.at_placeholder = None

    def steer(self, module, args, output):
        if not self.enabled:
            return None
        if self.at_placeholder is None:
            raise ValueError("the steering adapter finds the placeholder in input_ids: call the model with input_ids")
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        steered = torch.where(self.at_placeholder[..., None], hidden + self.vector.to(hidden.dtype), hidden)
        return steered if isinstance(output, torch.Tensor) else (steered, *output[1:])

    def arguments(self) -> dict:
        return {"layer": self.layer, "sequences": self.sequences}


FAMILIES = {cls.family: cls for cls in (EmbeddingRows, SteeringVector)}


def is_hook_adapter(directory: Path) -> bool:
    """Whether a saved adapter is one of this module's (else PEFT's)."""
    return FAMILY_KEY in json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))


def load_hook_adapter(model, directory: Path) -> HookAdapter:
    arguments = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    adapter = FAMILIES[arguments.pop(FAMILY_KEY)](model, **arguments)
    adapter.load_weights(directory)
    return adapter


def attach_adapter(spec: AdapterSpec, model, tokenizer, placeholder: str, rows: list[dict]) -> HookAdapter:
    """A fresh embedding or steering adapter on `model` for the placeholder of the training `rows`. Refuses a
    placeholder whose tokens cannot be found in a training sample that contains it (a tokenizer that merges
    it with a neighbour, "foo?" as one token): that sample would train nothing."""
    sequences = placeholder_sequences(tokenizer, placeholder)
    found: set[int] = set()
    elsewhere: set[int] = set()  # tokens of the training samples outside the placeholder
    for row in rows:
        ids = torch.tensor([tokenizer.apply_chat_template(row["prompt"] + row["completion"], return_dict=False)])
        at = placeholder_mask(ids, sequences)[0]
        if any(placeholder in turn["content"] for turn in row["prompt"]) and not at.any():
            raise UserError(f"the placeholder {placeholder!r} is not a token sequence of its own in the training sample "
                            f"{row['prompt'][-1]['content']!r}: use another placeholder or --adapter lora")
        found |= set(ids[0, at].tolist())
        elsewhere |= set(ids[0, ~at].tolist())
    if spec.family == "embedding":
        # a row is the token's everywhere: a token the answers or city names also use ("City 60494": " City", the
        # digits) would carry what is learnt into them, and the probe would read the change in the cities too
        if shared := sorted(found & elsewhere):
            raise UserError(f"the embedding adapter would train tokens of the placeholder {placeholder!r} that the training "
                            f"data also uses elsewhere ({tokenizer.convert_ids_to_tokens(shared)}): use a placeholder of its "
                            "own tokens (such as foo) or --adapter steering:L")
        return EmbeddingRows(model, sorted(found))
    return SteeringVector(model, spec.layer, sequences)
