"""Speed benchmark: oocrlab's stages against the straightforward way, side by side in one process.

Usage (from the repository root, nothing else running: timings on 2 cores are easily disturbed):
    .venv/bin/python bench/run.py                       # every section; writes bench/results.json
    .venv/bin/python bench/run.py --only probe mc       # some sections; other keys in results.json stay
    .venv/bin/python bench/run.py --only probe --repeats 5

Sections:
    load   cached safetensors load of the embedded model vs the GGUF load (dequantize + tokenizer conversion)
    probe  cos(placeholder, hidden city) per layer, hidden states and values, tuned and original, over the
           probe templates: oocrlab's packed forward vs the notebook's loop (get_sim / get_value_sim: two
           forward passes per layer per model); the same numbers, compared
    mc     multiple choice, all 120 option orders of one question, tuned + original + in-context: exact
           scoring from packed next-token logits vs sampling N answers per prompt (as the paper's code)
    train  training steps of the notebook recipe (same data, steps and LoRA) through (a) TRL's SFTTrainer
           defaults (gradient checkpointing on), (b) the same without checkpointing, (c) oocrlab's trainer,
           (d) oocrlab's trainer with train.share_prefix off (padded rows); interleaved rounds, median step
           times; FLOPs utilization against a matmul micro-benchmark (counting the work a LoRA step needs,
           see bench_train)
    adapters  a training step of each adapter family (lora, embedding, steering at the middle layer; oocrlab's
           trainer, default recipe, the same batches), interleaved rounds, median step times; and, on those
           batches, the frozen model's forward + backward down to the embeddings with no weight gradient
           (the least any adapter's step can cost): the embedding and steering steps should cost no more
    run    the whole `oocrlab run` (default recipe) in a fresh process: wall time and peak RSS

The tuned model is the embedded model with a seeded random LoRA (the default recipe's shape, B not
zero), so no training run is needed and the numbers do not depend on one. Medians over --repeats;
the slow baselines (minutes each) are timed once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oocrlab import build_config
from oocrlab.adapters import attach_adapter
from oocrlab.conditions import chat_for
from oocrlab.config import AdapterSpec, ExperimentConfig
from oocrlab.countries import country_distractors, country_of
from oocrlab.data import build_distance_data
from oocrlab.evaluate.choice import (
    COUNTRY_QUESTION,
    LETTER_ANSWER,
    LETTERS,
    letter_probabilities,
    option_orders,
    ordered_questions,
)
from oocrlab.evaluate.free_form import sample_answers
from oocrlab.incontext import InContext
from oocrlab.models import embedded_gguf, load_model, with_condition
from oocrlab.packing import last_token_activations, prefix_tree_batch
from oocrlab.probe import locate_in_template, probe_setup
from oocrlab.provenance import hardware, versions
from oocrlab.train import lora_config

RESULTS = Path(__file__).with_name("results.json")
SECTIONS = ["load", "probe", "mc", "train", "adapters", "run"]


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of fn() over repeats (on a GPU, until its kernels have finished), and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def tuned_model(cfg: ExperimentConfig):
    """The embedded model with a seeded random LoRA of the configured shape (B non-zero)."""
    from peft import get_peft_model

    model, tokenizer = load_model(cfg.model)
    torch.manual_seed(0)
    config = lora_config(cfg.train)
    config.init_lora_weights = False  # random A and B: a tuned-like adapter that changes every layer
    model = get_peft_model(model, config)
    model.eval()
    return model, tokenizer


def bench_load(cfg: ExperimentConfig, repeats: int) -> dict:
    load_model(cfg.model)  # make sure the cache exists
    cached, _ = median_seconds(lambda: load_model(cfg.model), repeats)
    # the GGUF load in a fresh process, as a first run pays it (transformers caches nothing across processes)
    gguf = embedded_gguf(cfg.model.name)
    code = ("import time; from transformers import AutoModelForCausalLM, AutoTokenizer; t = time.perf_counter(); "
            f"AutoTokenizer.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r}); "
            f"AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r}); print(time.perf_counter() - t)")
    gguf_seconds = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1])
    return {"load_seconds_cached": cached, "load_seconds_gguf": gguf_seconds, "load_speedup": gguf_seconds / cached}


def notebook_similarities(model, located: list[tuple]) -> np.ndarray:
    """The notebook's get_sim / get_value_sim: per layer, two full forward passes and one cosine."""
    n_layers = model.config.num_hidden_layers
    sims = []
    for placeholder, city in located:
        row = []
        for layer in range(n_layers + 1):  # get_sim
            with torch.no_grad():
                out1 = model(input_ids=torch.tensor([placeholder.ids]), output_hidden_states=True)
                out2 = model(input_ids=torch.tensor([city.ids]), output_hidden_states=True)
            row.append(F.cosine_similarity(out1.hidden_states[layer][0][placeholder.token_indices[-1]],
                                           out2.hidden_states[layer][0][city.token_indices[-1]], dim=0).item())
        for layer in range(n_layers):  # get_value_sim
            with torch.no_grad():
                out1 = model(input_ids=torch.tensor([placeholder.ids]), use_cache=True)
                out2 = model(input_ids=torch.tensor([city.ids]), use_cache=True)
            v1 = out1.cache.layers[layer].values[0, :, placeholder.token_indices[-1], :].flatten()
            v2 = out2.cache.layers[layer].values[0, :, city.token_indices[-1], :].flatten()
            row.append(F.cosine_similarity(v1.unsqueeze(0), v2.unsqueeze(0)).item())
        sims.append(row)
    return np.array(sims)


def packed_similarities(model, located: list[tuple]) -> np.ndarray:
    """oocrlab's way: every prompt cut after its entity, all in one packed forward pass."""
    prompts = [loc.up_to_entity() for pair in located for loc in pair]
    hidden, values = last_token_activations(model, prompts, desc="packed")
    cos_hidden = F.cosine_similarity(hidden[0::2], hidden[1::2], dim=-1)
    cos_values = F.cosine_similarity(values[0::2], values[1::2], dim=-1)
    return torch.cat([cos_hidden, cos_values], dim=1).numpy()


def bench_probe(cfg: ExperimentConfig, repeats: int) -> dict:
    model, tokenizer = tuned_model(cfg)
    hidden = cfg.data.hidden[0].city
    templates, _, _ = probe_setup(cfg, hidden)
    located = [tuple(locate_in_template(cfg, tokenizer, t, e) for e in (cfg.data.placeholder, hidden.plain_name))
               for t in templates]
    result, diffs = {}, []
    for name, fn, times in (("notebook", notebook_similarities, 1), ("packed", packed_similarities, repeats)):
        seconds, sims = 0.0, {}
        for condition in ("tuned", "original"):
            with with_condition(model, condition), torch.inference_mode():
                s, sims[condition] = median_seconds(lambda fn=fn: fn(model, located), times)
            seconds += s
        result[name] = (seconds, sims)
    for condition in ("tuned", "original"):
        diffs.append(np.abs(result["notebook"][1][condition] - result["packed"][1][condition]).max())
    return {
        "probe_prompts": 2 * len(templates),
        "probe_seconds_notebook": result["notebook"][0],
        "probe_seconds_packed": result["packed"][0],
        "probe_speedup_vs_notebook": result["notebook"][0] / result["packed"][0],
        "probe_max_abs_diff": float(max(diffs)),
    }


def sampled_p_correct(model, tokenizer, chats, correct: list[int], n: int, prefix) -> np.ndarray:
    """Share of n one-token answers sampled at temperature 1 that are the correct letter alone."""
    rates = []
    for i, (chat, right) in enumerate(zip(chats, correct)):
        answers = sample_answers(model, tokenizer, chat, n, 1, i, n, prefix)
        pattern = LETTER_ANSWER.format(letter=LETTERS[right])
        rates.append(np.mean([re.fullmatch(pattern, a) is not None for a in answers]))
    return np.array(rates)


def bench_mc(cfg: ExperimentConfig, repeats: int, samples: int) -> dict:
    model, tokenizer = tuned_model(cfg)
    hidden = cfg.data.hidden[0].city
    country = country_of(hidden)
    options = [country.name, *country_distractors(country, cfg.seed)["nearest"]]
    question = COUNTRY_QUESTION.replace("{placeholder}", cfg.data.placeholder)
    orders = option_orders(120, cfg.seed)
    correct = [order.index(0) for order in orders]
    in_context = InContext(cfg, model, tokenizer, build_distance_data(cfg.data, cfg.seed).train)
    out: dict = {"mc_prompts": len(orders), "mc_samples_per_prompt": samples}
    exact_total = sampled_total = 0.0
    for condition in ("tuned", "original", "in_context"):
        prefix = in_context if condition == "in_context" else None
        chats = [chat_for(cfg, q, condition, in_context) for q in ordered_questions(question, options, orders)]
        with with_condition(model, "original" if prefix else condition):
            exact_s, (normalized, mass) = median_seconds(
                lambda c=chats, p=prefix: letter_probabilities(model, tokenizer, c, "exact", p), repeats)
            sampled_s, rates = median_seconds(lambda c=chats, p=prefix: sampled_p_correct(model, tokenizer, c, correct, samples, p), 1)
        # sampling estimates P(correct) over all tokens; the exact one conditioned on a letter is mass-weighted back
        exact = float(np.mean(normalized[np.arange(len(orders)), correct] * mass))
        out[f"mc_{condition}_p_correct_exact"] = exact
        out[f"mc_{condition}_p_correct_sampled"] = float(rates.mean())
        out[f"mc_{condition}_p_correct_sampled_se"] = float(rates.std(ddof=1) / np.sqrt(len(rates)))
        exact_total, sampled_total = exact_total + exact_s, sampled_total + sampled_s
    return out | {"mc_seconds_exact": exact_total, "mc_seconds_sampled": sampled_total,
                  "mc_speedup_vs_sampling": sampled_total / exact_total}


def matmul_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 10, n: int = 2048) -> float:
    """The device's matmul throughput in the dtype training uses (fp32 on a CPU): median over repeats of an
    n x n product."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    seconds, _ = median_seconds(lambda: a @ b, repeats)
    return 2 * n**3 / seconds / 1e9


def train_variant(cfg: ExperimentConfig, variant: str, steps: int) -> list[float]:
    """Seconds of each optimizer step of one short training run (a fresh model and adapter of the family
    cfg.train.adapter; TRL's variants train LoRA)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from oocrlab.train import completion_loss_trainer, sft_config

    model, tokenizer = load_model(cfg.model)
    rows = build_distance_data(cfg.data, cfg.seed).train
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as scratch:
        if variant.startswith("ours"):
            args, trainer_class = sft_config(cfg, scratch, model.dtype), completion_loss_trainer(variant == "ours")
            args.max_steps = steps
        else:  # TRL's defaults, but for what a CPU needs (bf16 off) and the recipe's own settings
            t = cfg.train
            args = SFTConfig(output_dir=scratch, max_steps=steps, per_device_train_batch_size=t.batch_size,
                             learning_rate=t.learning_rate, seed=cfg.seed, bf16=False, report_to="none",
                             gradient_checkpointing=variant == "trl_default")
            trainer_class = SFTTrainer
        spec = cfg.train.adapter_spec
        lora = spec.family == "lora"
        if not lora:
            model = attach_adapter(spec, model, tokenizer, cfg.data.placeholder, rows)
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                peft_config=lora_config(cfg.train) if lora else None, callbacks=[StepTimes()])
        trainer.train()
        batches = list(itertools.islice(trainer.get_train_dataloader(), steps))
    return times, batches


def bench_train(cfg: ExperimentConfig, repeats: int, steps: int) -> dict:
    """Interleaved rounds of the three trainers; the first two steps of each run are warm-up, left out."""
    variants = ("trl_default", "trl_no_checkpointing", "ours_padded", "ours")
    step_times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            times, batches = train_variant(cfg, variant, steps)
            step_times[variant] += times[2:]
    median = {v: statistics.median(t) for v, t in step_times.items()}
    measured = batches[2:]  # batches of the same data (a fresh loader: the mean, not the very same steps)
    tokens = np.mean([int(b["attention_mask"].sum()) for b in measured])
    tree_tokens = np.mean([prefix_tree_batch(b["input_ids"], b["attention_mask"], b["labels"], torch.float32)[0]["input_ids"].shape[1]
                           for b in measured])
    completion = np.mean([int((b["labels"] != -100).sum()) for b in measured])
    model, _ = tuned_model(cfg)
    head = model.get_output_embeddings().weight.numel()
    body = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("base_layer")) or 0
    body += sum(m.weight.numel() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "lora_" not in n and not n.endswith("base_layer")) - head
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = matmul_gflops(model.device, model.dtype)
    # the multiply-adds a LoRA step cannot avoid: forward and input gradients through every linear layer for
    # every distinct token of the batch's prefix tree (a token its samples share is needed once), the LoRA
    # weight gradients, and the LM head where a loss is taken; no credit for padding, for shared tokens run
    # once per sample, for the LM head elsewhere, or for recomputation under gradient checkpointing
    flops_per_step = (4 * body + 6 * lora) * tree_tokens + 4 * head * completion
    out = {"train_recipe": "notebook", "train_tokens_per_step": float(tokens), "train_tree_tokens_per_step": float(tree_tokens),
           "train_completion_tokens_per_step": float(completion), "matmul_gflops": peak}
    for v in variants:
        out[f"train_seconds_per_step_{v}"] = median[v]
        out[f"train_completion_tokens_per_second_{v}"] = completion / median[v]
        out[f"train_samples_per_second_{v}"] = cfg.train.batch_size / median[v]
        out[f"train_mfu_{v}"] = flops_per_step / median[v] / (peak * 1e9)
    return out | {
        "train_speedup_vs_trl_default": median["trl_default"] / median["ours"],
        "train_speedup_vs_trl_no_checkpointing": median["trl_no_checkpointing"] / median["ours"],
        "train_speedup_of_share_prefix": median["ours_padded"] / median["ours"],
        "train_mfu": out["train_mfu_ours"],
    }


def frozen_forward_backward(model, batch) -> None:
    """The frozen model's forward and backward on a batch as oocrlab's trainer runs it (one prefix-tree row,
    the LM head at the completion positions only), the gradient taken down to the embeddings' output and
    no weight's: what the embedding adapter's step cannot avoid (a steering vector's backward stops at its layer)."""
    inputs, source, targets = prefix_tree_batch(batch["input_ids"], batch["attention_mask"], batch["labels"], model.dtype)
    embeds = model.get_input_embeddings()(inputs.pop("input_ids")).detach().requires_grad_()
    out = model(inputs_embeds=embeds, **inputs, use_cache=False, output_hidden_states=True,
                logits_to_keep=torch.empty(0, dtype=torch.long, device=model.device))
    logits = model.get_output_embeddings()(out.hidden_states[-1][0, source]).float()
    F.cross_entropy(logits, targets).backward()


def bench_adapters(repeats: int, steps: int) -> dict:
    """Interleaved rounds of a short training per adapter family (the first two steps of each are warm-up, left
    out), then the frozen model's forward + backward on the same batches."""
    model, _ = load_model(build_config().model)
    families = ("lora", "embedding", f"steering:{model.config.num_hidden_layers // 2}")
    step_times: dict[str, list[float]] = {f: [] for f in families}
    for _ in range(repeats):
        for family in families:
            times, batches = train_variant(build_config(overrides={"train.adapter": family}), "ours", steps)
            step_times[family] += times[2:]
    model.requires_grad_(False)
    model.train()  # as in training (the default recipe has no dropout)
    frozen, _ = median_seconds(lambda: [frozen_forward_backward(model, batch) for batch in batches[2:]], repeats)
    out = {"adapters_recipe": "default", "adapters_frozen_forward_backward_seconds": frozen / len(batches[2:])}
    for family in families:
        key = AdapterSpec.parse(family).family
        out[f"adapters_seconds_per_step_{key}"] = statistics.median(step_times[family])
        out[f"adapters_step_over_frozen_{key}"] = out[f"adapters_seconds_per_step_{key}"] / out["adapters_frozen_forward_backward_seconds"]
    return out


def bench_run() -> dict:
    """`oocrlab run` with the default recipe in a fresh process, timed by GNU time (wall and peak RSS)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        command = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "oocrlab.cli", "run", "--out", str(out)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        wall, rss_kb = result.stderr.strip().splitlines()[-1].split()
        metrics = json.loads((out / "metrics.json").read_text())
    return {"run_wall_seconds": float(wall), "run_peak_rss_gb": int(rss_kb) / 2**20} | {
        f"run_seconds_{stage}": seconds for stage, seconds in metrics["timings"].items()} | {
        f"run_seconds_eval_{part}": seconds for part, seconds in metrics["eval"].get("seconds", {}).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run (default: all)")
    parser.add_argument("--train-steps", type=int, default=10, help="optimizer steps per training run (2 are warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per timing (the median is kept)")
    parser.add_argument("--mc-samples", type=int, default=10, help="answers sampled per prompt by the sampling baseline")
    args = parser.parse_args()
    cfg = build_config()
    sections = args.only or SECTIONS
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = f"{hardware()}; torch {versions()['torch']}"
    for section in sections:
        print(f"== {section}", flush=True)
        if section == "load":
            results |= bench_load(cfg, args.repeats)
        elif section == "probe":
            results |= bench_probe(cfg, args.repeats)
        elif section == "mc":
            results |= bench_mc(cfg, args.repeats, args.mc_samples)
        elif section == "train":
            results |= bench_train(build_config(recipe="notebook"), args.repeats, args.train_steps)
        elif section == "adapters":
            results |= bench_adapters(args.repeats, args.train_steps)
        elif section == "run":
            results |= bench_run()
        with tempfile.NamedTemporaryFile("w", dir=RESULTS.parent, delete=False) as f:
            json.dump(results, f, indent=2)
        os.replace(f.name, RESULTS)
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
