"""Speed benchmark: oocrlab's stages against the straightforward way, side by side in one invocation.

Usage (from the repository root, nothing else running: timings on 2 cores are easily disturbed):
    .venv/bin/python bench/run.py                       # every section; writes bench/results.json
    .venv/bin/python bench/run.py --only probe mc       # some sections; other sections' keys in results.json stay
    .venv/bin/python bench/run.py --only train --repeats 5

Sections (run in this order):
    peaks  the CPU's (or GPU's) matmul rate in fp32 and bf16, in a fresh process before anything else: the best
           over square sizes 256-3072 and repeats; what the utilizations below are divided by
    load   the cached safetensors load of the embedded model vs the GGUF load (dequantize + tokenizer
           conversion), each in a fresh process, as a first `oocrlab run` pays it
    probe  cos(placeholder, hidden city) per layer, hidden states and values, tuned and original, over the
           probe templates: oocrlab's packed forward vs the notebook's loop (get_sim / get_value_sim: two
           forward passes per layer per model) and vs one forward pass per prompt (the loop's obvious fix)
    mc     multiple choice, all 120 option orders of one question, tuned + original + in-context: exact
           scoring from packed next-token logits vs sampling N answers per prompt (as the paper's code)
    train  training steps of the default recipe (same data, steps and LoRA): oocrlab's trainer in fp32 and in
           the default dtype (bf16 where the CPU has it), TRL 1.16's SFTTrainer defaults (gradient
           checkpointing on) and without checkpointing in both dtypes, and oocrlab's with train.share_prefix
           off; interleaved rounds, median step times; useful-work utilization (see bench_train) against the
           peak of the dtype each ran in
    adapters  a training step of each adapter family (lora, embedding, steering at the middle layer; oocrlab's
           trainer, default recipe, the same batches), interleaved rounds, median step times; and, on those
           batches, the frozen model's forward + backward down to the embeddings with no weight gradient
           (the least any adapter's step can cost): the embedding and steering steps should cost no more
    neighbours  the training step in a fresh process alone, beside a busy single-threaded process, and beside a
           second such training (both timed): oocrlab's threads as the CLI starts them (oocrlab.threads) against
           torch's default count
    run    the whole default run as `make run` does it (`oocrlab run`, fresh process): wall time and peak RSS

Each section's keys are replaced when it runs again; results.json records the commit and date of each.
The tuned model of probe and mc is the embedded model with a seeded random LoRA (the default recipe's
shape, B not zero), so no training run is needed. Medians over --repeats; the minutes-long baselines are
timed once.
"""

from __future__ import annotations


import argparse
import contextlib
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
from oocrlab.models import embedded_gguf, load_model, pick_device, pick_dtype, training_attention, with_condition
from oocrlab.packing import last_token_activations, prefix_tree_batch
from oocrlab.probe import locate_in_template, probe_setup
from oocrlab.provenance import hardware, versions
from oocrlab.train import lora_config

RESULTS = Path(__file__).with_name("results.json")
SECTIONS = ["peaks", "load", "probe", "mc", "train", "adapters", "neighbours", "run"]
DTYPES = ("float32", "bfloat16")


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


def fresh_process(code: str) -> str:
    """The last line `code` prints, run by this Python in a new process (nothing cached or warmed up by this one)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return result.stdout.strip().splitlines()[-1]


def bench_load(cfg: ExperimentConfig, repeats: int) -> dict:
    """Both loads in fresh processes, as a first `oocrlab run` pays them (median over repeats of the cached one)."""
    load_model(cfg.model)  # make sure the cache exists
    gguf = embedded_gguf(cfg.model.name)
    cached = statistics.median(float(fresh_process(
        "import time; from oocrlab.config import ModelConfig; from oocrlab.models import load_model; "
        "t = time.perf_counter(); load_model(ModelConfig()); print(time.perf_counter() - t)"))
        for _ in range(repeats))
    gguf_seconds = float(fresh_process(
        "import time; from transformers import AutoModelForCausalLM, AutoTokenizer; t = time.perf_counter(); "
        f"AutoTokenizer.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r}); "
        f"AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r}); print(time.perf_counter() - t)"))
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


def one_pass_similarities(model, located: list[tuple]) -> np.ndarray:
    """The notebook's loop fixed the obvious way: one forward pass per prompt, every layer read from it."""
    sims = []
    for placeholder, city in located:
        with torch.no_grad():
            out1 = model(input_ids=torch.tensor([placeholder.ids]), output_hidden_states=True, use_cache=True)
            out2 = model(input_ids=torch.tensor([city.ids]), output_hidden_states=True, use_cache=True)
        i, j = placeholder.token_indices[-1], city.token_indices[-1]
        row = [F.cosine_similarity(h1[0][i].float(), h2[0][j].float(), dim=0).item()
               for h1, h2 in zip(out1.hidden_states, out2.hidden_states)]
        row += [F.cosine_similarity(l1.values[0, :, i, :].flatten().float(), l2.values[0, :, j, :].flatten().float(), dim=0).item()
                for l1, l2 in zip(out1.cache.layers, out2.cache.layers)]
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
    variants = (("notebook", notebook_similarities, 1), ("one_pass", one_pass_similarities, repeats),
                ("packed", packed_similarities, repeats))
    for name, fn, times in variants:
        seconds, sims = 0.0, {}
        for condition in ("tuned", "original"):
            with with_condition(model, condition), torch.inference_mode():
                s, sims[condition] = median_seconds(lambda fn=fn: fn(model, located), times)
            seconds += s
        result[name] = (seconds, sims)
    for condition in ("tuned", "original"):
        diffs += [np.abs(result[name][1][condition] - result["packed"][1][condition]).max() for name in ("notebook", "one_pass")]
    return {
        "probe_prompts": 2 * len(templates),
        "probe_dtype": str(model.dtype).removeprefix("torch."),
        "probe_seconds_notebook": result["notebook"][0],
        "probe_seconds_one_pass_per_prompt": result["one_pass"][0],
        "probe_seconds_packed": result["packed"][0],
        "probe_speedup_vs_notebook": result["notebook"][0] / result["packed"][0],
        "probe_speedup_vs_one_pass_per_prompt": result["one_pass"][0] / result["packed"][0],
        "probe_max_abs_diff": float(max(diffs)),  # of the cosines, packed vs both loops, in probe_dtype
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


PEAK_SIZES = (256, 512, 1024, 1536, 2048, 3072)


def peak_gflops(dtype: str, repeats: int = 10) -> float:
    """The best matmul rate (GFLOP/s) over square sizes and repeats, in this process on its device."""
    device, best = pick_device(), 0.0
    for n in PEAK_SIZES:
        a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
        for _ in range(3):  # warm-up: the first products of a size are slower
            a @ b
        for _ in range(repeats):
            seconds, _ = median_seconds(lambda a=a, b=b: a @ b, 1)
            best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def bench_peaks() -> dict:
    """Each dtype's peak in its own fresh process, before any other section has run in this invocation."""
    out = {f"peak_gflops_{dtype}": float(fresh_process(
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from run import peak_gflops; "
        f"print(peak_gflops({dtype!r}))")) for dtype in DTYPES}
    return out | {"peak_sizes": list(PEAK_SIZES), "peak_bf16_over_fp32": out["peak_gflops_bfloat16"] / out["peak_gflops_float32"]}


def train_variant(cfg: ExperimentConfig, variant: str, steps: int) -> list[float]:
    """Seconds of each optimizer step of one short training run (a fresh model and adapter of the family
    cfg.train.adapter; TRL's variants train LoRA)."""
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from oocrlab.train import completion_loss_trainer, sft_config, training_dataset

    model, tokenizer = load_model(cfg.model)
    rows = build_distance_data(cfg.data, cfg.seed).train
    dataset = training_dataset(tokenizer, rows, cfg.train.loss_on)
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
        else:  # TRL's defaults, but for what a CPU needs (its bf16 autocast is GPU-only) and the recipe's own settings
            t = cfg.train
            args = SFTConfig(output_dir=scratch, max_steps=steps, per_device_train_batch_size=t.batch_size,
                             learning_rate=t.learning_rate, seed=cfg.seed, report_to="none",
                             bf16=model.dtype == torch.bfloat16 and torch.cuda.is_available(),
                             gradient_checkpointing=variant == "trl_default")
            trainer_class = SFTTrainer
        spec = cfg.train.adapter_spec
        lora = spec.family == "lora"
        if not lora:
            model = attach_adapter(spec, model, tokenizer, cfg.data.placeholder, rows)
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                peft_config=lora_config(cfg.train) if lora else None, callbacks=[StepTimes()])
        with training_attention(model) if variant.startswith("ours") else contextlib.nullcontext():  # as train.py
            trainer.train()
        batches = list(itertools.islice(trainer.get_train_dataloader(), steps))
    return times, batches


def bench_train(repeats: int, steps: int, peaks: dict) -> dict:
    """Interleaved rounds of the trainers in both dtypes (the first two steps of each run are warm-up, left out);
    `peaks` is the peaks section's result, measured first in this invocation."""
    default = str(pick_dtype(build_config().model, pick_device())).removeprefix("torch.")
    variants = [("trl_default", d) for d in DTYPES] + [("trl_no_checkpointing", d) for d in DTYPES] + [
        ("ours_padded", default)] + [("ours", d) for d in DTYPES]
    step_times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant, dtype in variants:
            times, batches = train_variant(build_config(overrides={"model.dtype": dtype}), variant, steps)
            step_times[variant, dtype] += times[2:]
    median = {v: statistics.median(t) for v, t in step_times.items()}
    measured = batches[2:]  # batches of the same data (a fresh loader: the mean, not the very same steps)
    tokens = np.mean([int(b["attention_mask"].sum()) for b in measured])
    tree_tokens = np.mean([prefix_tree_batch(b["input_ids"], b["attention_mask"], b["labels"], torch.float32)[0]["input_ids"].shape[1]
                           for b in measured])
    completion = np.mean([int((b["labels"] != -100).sum()) for b in measured])
    model, _ = tuned_model(build_config())
    head = model.get_output_embeddings().weight.numel()
    body = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("base_layer")) or 0
    body += sum(m.weight.numel() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "lora_" not in n and not n.endswith("base_layer")) - head
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Useful work: the multiply-adds a LoRA step cannot avoid: forward and input gradients through every linear
    # layer for every distinct token of the batch's prefix tree (a token its samples share is needed once), the
    # LoRA weight gradients, and the LM head where a loss is taken; no credit for padding, for shared tokens run
    # once per sample, for the LM head elsewhere, for attention, or for recomputation under gradient checkpointing
    flops_per_step = (4 * body + 6 * lora) * tree_tokens + 4 * head * completion
    out = {"train_recipe": "default", "train_dtype_default": default, "train_tokens_per_step": float(tokens),
           "train_tree_tokens_per_step": float(tree_tokens), "train_completion_tokens_per_step": float(completion),
           "train_useful_gflop_per_step": flops_per_step / 1e9}
    for (variant, dtype), seconds in median.items():
        out[f"train_seconds_per_step_{variant}_{dtype}"] = seconds
        out[f"train_samples_per_second_{variant}_{dtype}"] = build_config().train.batch_size / seconds
        utilization = flops_per_step / seconds / (peaks[f"peak_gflops_{dtype}"] * 1e9)
        out[f"train_useful_work_utilization{'' if variant == 'ours' else '_' + variant}_{dtype}"] = utilization
    return out | {
        "train_speedup_bf16_vs_fp32": median["ours", "float32"] / median["ours", "bfloat16"],
        "train_speedup_vs_trl_default": median["trl_default", default] / median["ours", default],
        "train_speedup_vs_trl_no_checkpointing": median["trl_no_checkpointing", default] / median["ours", default],
        "train_speedup_vs_trl_default_float32": median["trl_default", "float32"] / median["ours", "float32"],
        "train_speedup_of_share_prefix": median["ours_padded", default] / median["ours", default],
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


STEP_WORKER = ("import statistics, sys; sys.path.insert(0, {bench!r}); from run import train_variant; "
               "from oocrlab import build_config; from oocrlab.threads import THREADS; {start}"
               "times, _ = train_variant(build_config(), 'ours', {steps}); print(statistics.median(times[2:]))")
# oocrlab's threads (as the CLI starts them) against torch's default count under OpenMP's default waiting
POLICIES = {"oocrlab": "THREADS.start(); ", "openmp_default": ""}


def step_workers(policy: str, steps: int, count: int, busy: bool) -> list[float]:
    """Median step times of `count` default-recipe trainings started at once in fresh processes, beside a
    busy single-threaded loop when `busy`."""
    code = STEP_WORKER.format(bench=str(Path(__file__).parent), start=POLICIES[policy], steps=steps)
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(1 if busy else 0)  # the loop is running before the training looks at the load
        workers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(count)]
        results = [w.communicate() for w in workers]
    finally:
        if loop:
            loop.kill()
            loop.wait()
    if bad := [err for w, (_, err) in zip(workers, results) if w.returncode]:
        raise RuntimeError(bad[0][-3000:])
    return [float(out.strip().splitlines()[-1]) for out, _ in results]


def bench_neighbours(rounds: int, steps: int) -> dict:
    """The default recipe's training step alone, beside a busy single-threaded process and beside a second such
    training (the mean of the two), per thread policy; interleaved rounds, medians over them."""
    cases = {"alone": (1, False), "beside_busy_process": (1, True), "beside_second_run": (2, False)}
    seconds: dict[tuple[str, str], list[float]] = {(p, c): [] for p in POLICIES for c in cases}
    for _ in range(rounds):
        for policy in POLICIES:
            for case, (count, busy) in cases.items():
                seconds[policy, case].append(statistics.mean(step_workers(policy, steps, count, busy)))
    out = {}
    for policy in POLICIES:
        suffix = "" if policy == "oocrlab" else f"_{policy}"
        alone = statistics.median(seconds[policy, "alone"])
        out[f"train_seconds_per_step_alone{suffix}"] = alone
        for case in ("beside_busy_process", "beside_second_run"):
            out[f"train_seconds_per_step_{case}{suffix}"] = statistics.median(seconds[policy, case])
            out[f"train_slowdown_{case}{suffix}"] = out[f"train_seconds_per_step_{case}{suffix}"] / alone
    return out


def bench_run() -> dict:
    """The whole default run as `make run` does it (the console script, a fresh process), timed by GNU time
    (wall and peak RSS)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        command = ["/usr/bin/time", "-f", "%e %M", str(Path(sys.executable).with_name("oocrlab")), "run", "--out", str(out)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        wall, rss_kb = result.stderr.strip().splitlines()[-1].split()
        metrics = json.loads((out / "metrics.json").read_text())
    distance = metrics["eval"]["distance"]
    return {"run_wall_seconds": float(wall), "run_peak_rss_gb": int(rss_kb) / 2**20} | {
        f"run_seconds_{stage}": seconds for stage, seconds in metrics["timings"].items()} | {
        f"run_seconds_eval_{part}": seconds for part, seconds in metrics["eval"].get("seconds", {}).items()} | {
        "run_dtype": metrics["train"]["dtype"], "run_verdicts": {k: v["answer"] for k, v in metrics.get("verdict", {}).items()},
        "run_heldout_over_best_baseline": distance["tuned_mae_over_best_baseline"],
        "run_heldout_over_best_baseline_ci95": distance["tuned_mae_over_best_baseline_ci95"]}


def commit() -> str:
    """The checked-out commit, marked +dirty when the code that ran (src/, bench/ but its results) differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", "../src", ".", ":(exclude)results.json") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run (default: all)")
    parser.add_argument("--train-steps", type=int, default=10, help="optimizer steps per training run (2 are warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per timing (the median is kept)")
    parser.add_argument("--neighbour-rounds", type=int, default=1, help="rounds of the neighbours section (minutes each)")
    parser.add_argument("--mc-samples", type=int, default=10, help="answers sampled per prompt by the sampling baseline")
    args = parser.parse_args()
    cfg = build_config()
    sections = [s for s in SECTIONS if s in (args.only or SECTIONS)]
    if {"train"} & set(sections) and "peaks" not in sections:
        sections.insert(0, "peaks")  # utilizations divide by peaks measured in the same invocation
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = f"{hardware()}; torch {versions()['torch']}"
    records = results.setdefault("sections", {})
    peaks: dict = {}
    for section in sections:
        print(f"== {section}", flush=True)
        if section == "peaks":
            found = peaks = bench_peaks()
        elif section == "load":
            found = bench_load(cfg, args.repeats)
        elif section == "probe":
            found = bench_probe(cfg, args.repeats)
        elif section == "mc":
            found = bench_mc(cfg, args.repeats, args.mc_samples)
        elif section == "train":
            found = bench_train(args.repeats, args.train_steps, peaks)
        elif section == "adapters":
            found = bench_adapters(args.repeats, args.train_steps)
        elif section == "neighbours":
            found = bench_neighbours(args.neighbour_rounds, args.train_steps)
        else:
            found = bench_run()
        for key in records.get(section, {}).get("keys", []):  # the section's earlier figures, all replaced
            results.pop(key, None)
        results |= found
        records[section] = {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "keys": list(found)}
        with tempfile.NamedTemporaryFile("w", dir=RESULTS.parent, delete=False) as f:
            json.dump(results, f, indent=2)
        os.replace(f.name, RESULTS)
    width = max(map(len, results))
    for key, value in results.items():
        if key != "sections":
            print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
