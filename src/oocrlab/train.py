"""SFT through TRL's SFTTrainer on the prompt-completion data (loss on the completion, on the answer alone, or on
every token: `train.loss_on`), of a LoRA adapter
(PEFT) or of one of adapters.py's (the placeholder's embedding rows, a steering vector): `train.adapter`.

Settings TRL 1.x changes from the HF Trainer, set back here on purpose: bf16 only where the GPU has it
(TRL's default bf16=True fails on a CPU) and no gradient checkpointing (twice as slow for a small
model that fits in memory). Nothing is evaluated mid-run; `train.checkpoints` times the Trainer saves a
checkpoint (adapter, optimizer, scheduler, RNG states) into the run's checkpoints/, keeping the last, and
an interrupted training continues from it. The adapter is written once, at the end, atomically. The
loss projects only the labelled positions through the LM head, on prefix-shared batches
(`CompletionLoss`): TRL's loss and gradients, up to float rounding, at a fraction of the time on a CPU.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from oocrlab.adapters import (
    HookAdapter,
    attach_adapter,
    is_hook_adapter,
    load_hook_adapter,
)
from oocrlab.config import ExperimentConfig, TrainConfig
from oocrlab.distributed import is_main_process, wait_for_everyone
from oocrlab.errors import UserError
from oocrlab.models import half_precision, training_attention
from oocrlab.packing import prefix_tree_batch
from oocrlab.rundir import Run, read_jsonl, rewrite_command, write_jsonl
from oocrlab.scalars import training_callbacks
from oocrlab.threads import THREADS

# TRL 1.x and PEFT still use the name `gradient_checkpointing`, which transformers 5 renamed
# (activation_checkpointing); the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing` is deprecated", category=FutureWarning)


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = "all-linear" if cfg.lora_targets == ["all-linear"] else list(cfg.lora_targets)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        layers_to_transform=cfg.lora_layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(cfg: ExperimentConfig, output_dir: str | Path, model_dtype: torch.dtype):
    from trl import SFTConfig

    t = cfg.train
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_length=t.max_length,
        completion_only_loss=cfg.train.loss_on != "all",  # "answer" marks its tokens as the completion (training_dataset)
        # a GPU's mixed precision through accelerate; a CPU's is CompletionLoss's own autocast (models.half_precision)
        bf16=model_dtype == torch.bfloat16 and torch.cuda.is_available(),
        fp16=model_dtype == torch.float16,
        gradient_checkpointing=False,
        logging_steps=1,
        logging_nan_inf_filter=False,  # the Trainer would log a NaN step as the window's average: hide nothing
        # a fraction < 1 is a share of all steps for the Trainer: checkpoints at 1/(n+1), 2/(n+1), ...
        save_strategy="steps" if t.checkpoints else "no",
        save_steps=1 / (t.checkpoints + 1),
        save_total_limit=1,
        eval_strategy="no",
        report_to="none",
        seed=cfg.seed,  # SFTTrainer seeds with it before the adapter's random init
        data_seed=cfg.seed,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
    )


MASKABLE_ATTENTION = ("sdpa", "eager")  # attention that reads a 4-D float mask (flash-attention does not)


def completion_loss_trainer(share_prefix: bool):
    """SFTTrainer with `compute_loss` replaced (a class made on first use: TRL is imported lazily)."""
    import torch.nn.functional as F
    from trl import SFTTrainer

    class CompletionLoss(SFTTrainer):
        """Cross-entropy of the labelled tokens (train.loss_on), the LM head applied at their positions only, and (with
        `share_prefix`) each batch run as one row of its prefix tree.

        TRL 1.16's fused head scores the same positions but also computes, per step, the gradient of the
        LM head weight (frozen, and tied to the embedding) and every position's entropy: about 0.45 of
        1.8 s per step for SmolLM2-135M on 2 CPU cores. The samples of a batch share their chat header
        and the question's first words (14 of ~32 tokens in the default recipe, ~30 of ~52 with SmolLM2's
        default system prompt); packing.prefix_tree_batch runs those once, with a 4-D mask that shows each
        token exactly its own sample's earlier tokens: the same loss and gradients up to float rounding
        (with LoRA dropout, the shared tokens share one dropout mask). Models whose logits are scaled or
        soft-capped keep TRL's loss. Logged as TRL does: loss, mean_token_accuracy, num_tokens.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            THREADS.adapt()  # here, not in a callback: every trainer of this class looks, bench/run.py's too
            with half_precision(self.accelerator.unwrap_model(model)):
                return self._completion_loss(model, inputs, return_outputs, num_items_in_batch)

        def _completion_loss(self, model, inputs, return_outputs, num_items_in_batch):
            core = self.accelerator.unwrap_model(model)  # DDP exposes neither the config nor the head
            head_config = core.config.get_text_config()
            if return_outputs or getattr(head_config, "final_logit_softcapping", None) or getattr(head_config, "logit_scale", None):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # through the model's own forward (DDP and PEFT wrappers see the call), keeping no logits there:
            # even one per row would read the whole LM head weight
            no_logits = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
            if share_prefix and core.config._attn_implementation in MASKABLE_ATTENTION:
                batch, source, targets = prefix_tree_batch(inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                                                           core.dtype)
                out = model(**batch, use_cache=False, output_hidden_states=True, logits_to_keep=no_logits)
                hidden = out.hidden_states[-1][0, source]  # already after the final norm
            else:
                labels = inputs["labels"][:, 1:]
                mask = labels != -100
                out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                            output_hidden_states=True, logits_to_keep=no_logits)
                hidden, targets = out.hidden_states[-1][:, :-1][mask], labels[mask]
            logits = core.get_output_embeddings()(hidden).float()
            count = len(targets) if num_items_in_batch is None else num_items_in_batch
            loss = F.cross_entropy(logits, targets, reduction="sum") / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count covers every rank
            mode = "train" if model.training else "eval"
            correct = self.accelerator.gather_for_metrics((logits.argmax(-1) == targets).sum()).sum()
            valid = self.accelerator.gather_for_metrics(torch.tensor(len(targets), device=targets.device)).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / valid.clamp(min=1)).item())
            if mode == "train":
                self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

        # A HookAdapter is neither a PreTrainedModel nor a PeftModel: the Trainer would save the whole model's
        # state dict into every checkpoint and could not load it back. Its checkpoints hold the adapter alone.
        def _save(self, output_dir=None, state_dict=None):
            if not isinstance(self.model, HookAdapter):
                return super()._save(output_dir, state_dict)
            if self.args.should_save:
                self.model.save_pretrained(output_dir or self.args.output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if not isinstance(self.model, HookAdapter):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            self.model.load_weights(Path(resume_from_checkpoint))

    return CompletionLoss


def check_layers(cfg: TrainConfig, model) -> None:
    """Refuse decoder layers (LoRA's, the steering vector's) the model does not have, before anything is written."""
    n = model.config.get_text_config().num_hidden_layers
    if cfg.lora_layers is not None and max(cfg.lora_layers) >= n:
        raise UserError(f"train.lora_layers asks for layer {max(cfg.lora_layers)}, but the model has layers 0-{n - 1}")
    layer = cfg.adapter_spec.layer
    if layer is not None and layer >= n:
        raise UserError(f"train.adapter {cfg.adapter} asks for decoder layer {layer}, but the model has layers 0-{n - 1}")


def answer_span(row: dict[str, Any]) -> tuple[int, int]:
    """Where a row's answer lies in its completion's text: a direction row's direction word, else all of it (a
    distance's number and unit)."""
    content = row["completion"][0]["content"]
    if row.get("kind") == "direction":
        start = content.index(f" is {row['direction']} of ") + len(" is ")
        return start, start + len(row["direction"])
    return 0, len(content)


def answer_tokens(tokenizer, row: dict[str, Any]) -> dict[str, list[int]]:
    """A row tokenized as TRL tokenizes a prompt and completion (the chat template over both), with
    completion_mask on the tokens that overlap its answer (answer_span) only."""
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=False)
    ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], return_dict=False)
    text = tokenizer.decode(ids[len(prompt):])
    if ids[: len(prompt)] != prompt or not text.startswith(row["completion"][0]["content"]):
        raise UserError("this chat template does not render the answer right after the prompt: train.loss_on=answer "
                        "cannot find its tokens (use completion)")
    start, end = answer_span(row)
    # each completion token's end in the decoded completion; a token overlapping the answer's characters carries the loss
    ends = [len(tokenizer.decode(ids[len(prompt): i + 1])) for i in range(len(prompt), len(ids))]
    mask = [int(before < end and after > start) for before, after in zip([0, *ends[:-1]], ends)]
    return {"input_ids": ids, "completion_mask": [0] * len(prompt) + mask}


def training_dataset(tokenizer, rows: list[dict[str, Any]], loss_on: str):
    """The rows as the trainer reads them: prompt and completion, which TRL renders through the chat template
    (its loss on the completion, or with loss_on "all" on every token: sft_config), or for "answer" tokenized
    here the same way with only the answer's tokens marked as the completion (answer_tokens)."""
    from datasets import Dataset

    if loss_on == "answer":
        return Dataset.from_list([answer_tokens(tokenizer, r) for r in rows])
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def trajectory_steps(requested: list[int] | None, max_steps: int) -> list[int]:
    """The steps before the last at which the adapter is snapshotted: `requested` (train.trajectory), or by default
    0, 1, 2, 4, 8, ... (the last step's adapter is the run's own)."""
    steps = requested if requested is not None else [0, *(2**k for k in range(max(max_steps, 1).bit_length()))]
    return sorted({s for s in steps if s < max_steps})


def snapshots(directory: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every finished snapshot in a run's trajectory/, by step."""
    found = [(int(p.name.removeprefix("step-")), p) for p in directory.glob("step-*") if p.name.removeprefix("step-").isdigit()]
    return sorted((step, p) for step, p in found if has_adapter(p))


def check_lengths(tokenizer, rows: list[dict[str, Any]], max_length: int) -> None:
    """Refuse samples TRL would silently truncate (a cut completion trains the wrong answer)."""
    longest = max(len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], return_dict=False)) for r in rows)
    if longest > max_length:
        raise UserError(f"a training sample has {longest} tokens, more than train.max_length={max_length}: raise it")


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_adapter(model, target: Path) -> None:
    """Write the adapter into a temporary directory, then rename it into place."""
    if target.exists():
        raise UserError(f"{target} already exists; nothing was overwritten: train into a new run (oocrlab run --out NEW)")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".adapter."))
    try:
        model.save_pretrained(tmp)  # safetensors (PEFT's default)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finite_step(logs: dict[str, Any]) -> bool:
    """A logged step whose loss and gradient norm are finite (a finite loss with a NaN gradient still
    corrupts the weights)."""
    return all(logs.get(key) is None or math.isfinite(logs[key]) for key in ("loss", "grad_norm"))


TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint


def unreadable(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (the Trainer did not finish it: killed or out of space while saving; or a
    file of it was damaged since), else None. Each file's structure is checked, its data read where that is cheap."""
    path = checkpoint / TRAINER_STATE
    try:
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(checkpoint.iterdir()):
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass  # the header, and that the file is as long as it says
            elif path.suffix in (".pt", ".pth", ".bin"):  # torch.save's zip: every member's CRC
                with zipfile.ZipFile(path) as archive:
                    if archive.testzip() is not None:
                        raise zipfile.BadZipFile("a damaged member")
    except Exception as e:  # whatever a damaged file raises in its reader: it cannot be resumed from
        return f"{path.name}: {(str(e).splitlines() or [type(e).__name__])[0]}"
    return None


def checkpoints(directory: Path) -> tuple[list[Path], list[Path]]:
    """(checkpoints that can be resumed from, oldest first; those that cannot: unfinished or damaged)."""
    finished, unfinished = [], []
    for path in sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.removeprefix("checkpoint-"))):
        (unfinished if unreadable(path) else finished).append(path)
    return finished, unfinished


def clear_unfinished(directory: Path) -> list[Path]:
    """Leave `directory` holding finished checkpoints only: not one cut short or damaged, nor a file beside them (the
    model card the Trainer writes there, which a full disk leaves empty). Returns the checkpoints deleted."""
    finished, unfinished = checkpoints(directory)
    for path in directory.iterdir() if directory.is_dir() else ():
        if path not in finished:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return unfinished


def last_checkpoint(directory: Path) -> Path | None:
    finished, _ = checkpoints(directory)
    return finished[-1] if finished else None


def train(cfg: ExperimentConfig, run: Run, model, tokenizer) -> tuple[dict[str, Any], Any]:
    """Fine-tune a fresh adapter of the `train.adapter` family on `model`, or continue the run's last
    checkpoint when an earlier training of this run was interrupted; returns (metrics, the adapted model: a
    PeftModel or a HookAdapter)."""
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    run.require(run.train_file, "data")
    if run.adapter_dir.exists():
        raise UserError(f"{run.adapter_dir} already exists; nothing was overwritten: train into a new run (oocrlab run --out NEW)")
    rows = read_jsonl(run.train_file)
    check_lengths(tokenizer, rows, cfg.train.max_length)
    check_layers(cfg.train, model)
    dataset = training_dataset(tokenizer, rows, cfg.train.loss_on)

    class LossBar(TrainerCallback):
        """One progress bar with the latest loss (it replaces the Trainer's own bar, which would also print
        every step's log dict); stops training at a non-finite loss, saving no checkpoint of it."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            disable=not state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)
            if state.global_step >= state.max_steps:  # the adapter is saved next; the Trainer resumed from a
                control.should_save = False  # checkpoint of the last step would train one step too many

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")
                if not finite_step(logs):
                    control.should_training_stop = True  # every later step would only spread the NaN
                    control.should_save = False  # the weights may already hold it

        def on_train_end(self, args, state, control, **kwargs):
            if hasattr(self, "bar"):  # (also called when training fails, maybe before it began)
                self.bar.close()

    class Snapshots(TrainerCallback):
        """The adapter at each of trajectory_steps, saved into the run's trajectory/step-N/ (the trajectory stage's)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.steps = trajectory_steps(cfg.train.trajectory, state.max_steps)
            self.save(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.save(state, model)

        def save(self, state, model):
            target = run.trajectory_dir / f"step-{state.global_step}"
            if state.global_step in self.steps and state.is_world_process_zero and not target.exists():
                target.parent.mkdir(exist_ok=True)
                save_adapter(model, target)

    if is_main_process():
        for path in clear_unfinished(run.checkpoints_dir):  # never resumed from, nor left to the Trainer's rotation
            tqdm.write(f"[oocrlab] {path} could not be resumed from (unfinished or damaged): deleted", file=sys.stderr)
    wait_for_everyone()
    resume = last_checkpoint(run.checkpoints_dir)
    # read now: the Trainer deletes this checkpoint once it has saved a later one
    resumed = json.loads((resume / TRAINER_STATE).read_text(encoding="utf-8")) if resume else {}
    if is_main_process() and run.trajectory_dir.exists():  # snapshots after the step training resumes from are taken again
        kept = {p for step, p in snapshots(run.trajectory_dir) if resume and step <= resumed["global_step"]}
        for path in set(run.trajectory_dir.iterdir()) - kept:
            shutil.rmtree(path, ignore_errors=True)
    spec = cfg.train.adapter_spec
    trainer = completion_loss_trainer(cfg.train.share_prefix)(
        model=model if spec.family == "lora" else attach_adapter(spec, model, tokenizer, cfg.data.placeholder, rows),
        args=(args := sft_config(cfg, run.checkpoints_dir, model.dtype)),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.train) if spec.family == "lora" else None,
        callbacks=[bar := LossBar(), Snapshots(),
                   *(training_callbacks(cfg.train, run, resumed.get("global_step")) if is_main_process() else [])],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if resume is not None:
        tqdm.write(f"[oocrlab] continuing training from {resume}", file=sys.stderr)
    start = time.perf_counter()
    try:
        with training_attention(model):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException:
        bar.on_train_end(args, trainer.state, trainer.control)  # the error's line starts on a line of its own
        if is_main_process():  # a checkpoint the failure cut short is never left looking like one
            clear_unfinished(run.checkpoints_dir)
        raise
    seconds = time.perf_counter() - start
    # the Trainer's history: a resumed training's includes the steps before its checkpoint
    log = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"), "epoch": round(e.get("epoch") or 0, 4),
            "grad_norm": e.get("grad_norm")} for e in trainer.state.log_history if "loss" in e]
    if bad := next((entry for entry in log if not finite_step(entry)), None):
        kept = last_checkpoint(run.checkpoints_dir)
        key = "loss" if not math.isfinite(bad["loss"]) else "grad_norm"
        raise UserError(f"the training {'loss' if key == 'loss' else 'gradient norm'} became {bad[key]} at step {bad['step']}; "
                        "no adapter was saved"
                        + (f" (the last good checkpoint is {kept})" if kept else "")
                        + f": lower train.learning_rate (now {cfg.train.learning_rate:g}) or use float32 (model.dtype)")
    tuned = trainer.model
    tuned.eval()
    if is_main_process():
        save_adapter(tuned, run.adapter_dir)
        write_jsonl(run.train_log, log)
    trainable, total = count_parameters(tuned)
    tokens = int(trainer.state.num_input_tokens_seen) - int(resumed.get("num_input_tokens_seen", 0))  # this call's
    metrics = {
        "loss_first": log[0]["loss"],
        "loss_last": log[-1]["loss"],
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed.get("global_step"),
        "samples": len(rows),
        "examples_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "epochs": round(trainer.state.epoch or 0, 4),
        "seconds": round(seconds, 2),
        "tokens_seen": tokens,
        "tokens_per_second": tokens / seconds,
        "samples_per_second": result.metrics["train_samples_per_second"],
        "adapter": cfg.train.adapter,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    return metrics, tuned


def has_adapter(adapter_dir: Path) -> bool:
    return (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()


def require_adapter(adapter_dir: Path, fix: str | None = None) -> None:
    """Refuse early (before loading any model) when a run has no safetensors adapter; `fix` is the command that
    trains it (a run's own adapter's by default)."""
    if not has_adapter(adapter_dir):
        raise UserError(f"{adapter_dir} holds no safetensors adapter: run `{fix or f'oocrlab train {adapter_dir.parent}'}` first")


def corrupt(adapter_dir: Path, error: Exception) -> UserError:
    return UserError(f"the adapter in {adapter_dir} is corrupt or does not fit this model ({type(error).__name__}): retrain it "
                     f"with `{rewrite_command(adapter_dir)}`")


def load_adapter(model, adapter_dir: Path):
    """The base model with the run's adapter (a LoRA PeftModel or a HookAdapter, as its adapter_config.json
    says); safetensors only, and a clear line when it is damaged."""
    from peft import PeftModel

    require_adapter(adapter_dir)
    try:
        tuned = load_hook_adapter(model, adapter_dir) if is_hook_adapter(adapter_dir) else PeftModel.from_pretrained(model, adapter_dir)
    except UserError:
        raise
    except Exception as e:
        raise corrupt(adapter_dir, e) from None
    tuned.eval()
    return tuned


def add_adapter(tuned, adapter_dir: Path, name: str) -> None:
    """Another adapter of the same family (a fine-tuned control's) on the adapted model, under `name`, acting only
    when selected (models.with_condition)."""
    if is_hook_adapter(adapter_dir) != isinstance(tuned, HookAdapter):
        raise UserError(f"the adapter in {adapter_dir} is of another family than the run's: retrain it with "
                        f"`{rewrite_command(adapter_dir)}`")
    try:
        tuned.load_adapter(adapter_dir, adapter_name=name)
    except UserError:
        raise
    except Exception as e:
        raise corrupt(adapter_dir, e) from None
    tuned.eval()
