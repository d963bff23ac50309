"""``llmprune bench``: inference speed and memory of a model, against a baseline measured alternately.

One *round* on a model is: prefill a ``[batch, prompt_len]`` prompt (timed: prefill throughput), decode
``new_tokens`` greedy tokens from it with the KV cache (timed: decode throughput at ``batch``), then, when
``batch`` > 1, prefill the first prompt alone and pick its first token (timed: time to first token) and
decode from it (timed: decode throughput at batch 1). Rounds alternate between the model and the baseline
(A, B, A, B, ...), so both see the same machine load; each figure is the median of ``repeats`` rounds after
``warmup`` rounds, and each speedup is the ratio of the two medians.

Peak memory is the model's weights and buffers as stored plus the peak working memory of a round above
what was in use before it: on CUDA ``torch.cuda.max_memory_allocated`` (reset before the round); on the
CPU the peak resident set size (Linux: ``VmHWM``, reset through ``/proc/self/clear_refs`` after
``malloc_trim`` returned freed heap pages; elsewhere RSS sampled every millisecond).
"""

from __future__ import annotations

import contextlib
import inspect
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from llmprune.config import Count, DType, ModelName, RunConfig, Seed, StrictModel
from llmprune.errors import UsageError
from llmprune.inference.kernels import (
    SparseKernelsReport,
    model_bytes,
    require_sparse_kernels,
    use_sparse_kernels,
)
from llmprune.inference.sparse_linear import BREAK_EVEN_SPARSITY
from llmprune.models.architecture import check_window, context_length
from llmprune.storage import trim_heap

METRICS = ("prefill", "ttft", "decode_1", "decode_batch")


class BenchConfig(StrictModel):
    """``llmprune bench``: what to measure and how."""

    model: ModelName = "smollm2"
    baseline: str | None = Field(None, description="a second model, measured alternately with MODEL")
    prompt_len: Count = Field(512, ge=1, description="prompt tokens")
    batch: Count = Field(8, ge=1, description="prompts per batch for prefill and batched decode")
    new_tokens: Count = Field(64, ge=1, description="greedy tokens decoded after the prompt (no early stop)")
    repeats: Count = Field(5, ge=1, description="timed rounds per model (figures are medians)")
    warmup: Count = Field(1, ge=0, description="untimed rounds per model first")
    prompt: Literal["random", "embedded"] = Field(
        "random", description="random token ids (seeded), or windows of the embedded evaluation text"
    )
    seed: Seed = Field(0, description="seed of the random prompt")
    threads: Count | None = Field(
        None, ge=1, description="CPU threads for torch (default: torch's own choice, usually the cores)"
    )
    dtype: DType = "auto"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    sparse_kernels: bool = Field(
        False,
        description="run MODEL's sparse linear layers on sparse kernels: on the CPU llmprune's own (layers "
        f"with >= {BREAK_EVEN_SPARSITY:.0%} zeros, any pattern), on CUDA 2:4 sparse tensor cores (compute "
        "capability >= 8.0); the baseline stays dense",
    )
    kernel_backend: Literal["auto", "cpu", "cusparselt", "cutlass"] = Field(
        "auto",
        description="auto: cpu on the CPU; on CUDA cuSPARSELt where PyTorch has it, else CUTLASS",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return RunConfig._device(value)


@dataclass
class ModelFigures:
    """Medians over the timed rounds of one model, and the raw seconds they come from."""

    name: str
    prefill_tokens_per_s: float
    decode_tokens_per_s_batch1: float
    decode_tokens_per_s_batch: float
    time_to_first_token_s: float
    peak_memory_bytes: int
    weight_bytes: int
    working_memory_bytes: int
    seconds: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class BenchReport:
    """Everything ``bench`` measured; ``speedup`` is baseline over model per metric (> 1: model better)."""

    device: str
    dtype: str
    settings: dict[str, Any]
    versions: dict[str, str]
    memory_method: str
    model: ModelFigures
    baseline: ModelFigures | None = None
    speedup: dict[str, float] | None = None
    order: list[str] = field(default_factory=list)
    kernels: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- timing -------------------------------------------------------------------------------------------

_clock = time.perf_counter


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn`` takes, with the device synchronised before and after, and its result."""
    _synchronize(device)
    start = _clock()
    result = fn()
    _synchronize(device)
    return _clock() - start, result


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache_of(output: Any) -> Any:
    # transformers 5 names the KV cache ``cache`` (``past_key_values`` before)
    cache = output.get("cache")
    return cache if cache is not None else output.past_key_values


@torch.inference_mode()
def prefill(model: nn.Module, prompt: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Run the prompt with the KV cache; return the cache and the greedy next token ``[batch, 1]``."""
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}  # as generate() does
    output = model(input_ids=prompt, use_cache=True, **extra)
    return _cache_of(output), output.logits[:, -1:].argmax(-1)


@torch.inference_mode()
def decode(model: nn.Module, cache: Any, token: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy single-token steps with the KV cache (no stopping token); the tokens produced."""
    produced = []
    key = "cache" if _accepts(model, "cache") else "past_key_values"
    for _ in range(steps):
        output = model(input_ids=token, use_cache=True, **{key: cache})
        cache, token = _cache_of(output), output.logits[:, -1:].argmax(-1)
        produced.append(token)
    return torch.cat(produced, dim=1)


def measure_round(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device
) -> dict[str, float]:
    """Seconds of one round: prefill and decode at the prompt's batch, first token and decode at batch 1."""
    seconds = {}
    seconds["prefill"], (cache, token) = timed(device, lambda: prefill(model, prompt))
    seconds["decode_batch"], _ = timed(device, lambda: decode(model, cache, token, new_tokens))
    if prompt.shape[0] == 1:  # the batch-1 figures are these
        seconds["ttft"], seconds["decode_1"] = seconds["prefill"], seconds["decode_batch"]
        return seconds
    del cache
    seconds["ttft"], (cache, token) = timed(device, lambda: prefill(model, prompt[:1]))
    seconds["decode_1"], _ = timed(device, lambda: decode(model, cache, token, new_tokens))
    return seconds


def alternate(
    rounds: dict[str, Callable[[], dict[str, float]]],
    warmup: int,
    repeats: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    """Run the rounds of every model in turn (A, B, A, B, ...), ``warmup`` untimed times then ``repeats``
    recorded times; the values each recorded round returned, per model and key, and the order of the
    recorded rounds. ``progress(done, total)`` is called before each round."""
    samples: dict[str, dict[str, list[float]]] = {label: {} for label in rounds}
    order = []
    total = (warmup + repeats) * len(rounds)
    for index in range(warmup + repeats):
        for number, (label, run) in enumerate(rounds.items()):
            if progress is not None:
                progress(index * len(rounds) + number, total)
            values = run()
            if index >= warmup:
                order.append(label)
                for key, value in values.items():
                    samples[label].setdefault(key, []).append(value)
    return samples, order


# ---- memory -------------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        _status_kib("VmHWM")
    except OSError:
        return False
    return True


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA: torch.cuda.max_memory_allocated over a round, above the allocation before it"
    if _can_reset_peak_rss():
        return "CPU: peak RSS (VmHWM, reset via /proc/self/clear_refs) over a round, above the RSS before it"
    return "CPU: RSS sampled every 1 ms over a round, peak above the RSS before it"


@contextlib.contextmanager
def peak_working_memory(device: torch.device) -> Iterator[list[int]]:
    """Yields a list that receives the peak bytes in use above the starting level, once the block ends."""
    found: list[int] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield found
        torch.cuda.synchronize(device)
        found.append(max(0, torch.cuda.max_memory_allocated(device) - start))
        return
    trim_heap()  # an earlier round's freed memory must not hide this one's
    if _can_reset_peak_rss():  # resets the high-water mark to the current RSS
        start = _status_kib("VmRSS")
        yield found
        found.append(max(0, _status_kib("VmHWM") - start) * 1024)
        return
    import psutil

    process, peak, done = psutil.Process(), [0], threading.Event()
    start = process.memory_info().rss

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield found
    finally:
        done.set()
        sampler.join()
    found.append(max(0, max(peak[0], process.memory_info().rss) - start))


# ---- inputs and checks --------------------------------------------------------------------------------


def check_context(name: str, config: Any, prompt_len: int, new_tokens: int) -> None:
    """A prompt and its decoded tokens must fit in the model's context."""
    limit = context_length(config)
    if limit is not None and prompt_len <= limit:
        what = f"--prompt-len {prompt_len} + --new-tokens {new_tokens} ({prompt_len + new_tokens} tokens)"
    else:
        what = f"--prompt-len {prompt_len}"
    check_window(name, config, prompt_len + new_tokens, what)


def _read_config(name: str) -> Any:
    from transformers import AutoConfig

    from llmprune.models.loading import _from_hub, resolve_checkpoint

    return _from_hub(AutoConfig, resolve_checkpoint(name))


def make_prompt(config: BenchConfig, vocab_size: int, tokenizer: Any = None) -> torch.Tensor:
    """``[batch, prompt_len]`` token ids: seeded random ids below ``vocab_size``, or embedded-text windows."""
    if config.prompt == "random":
        generator = torch.Generator().manual_seed(config.seed)
        return torch.randint(0, vocab_size, (config.batch, config.prompt_len), generator=generator)
    from llmprune.data.text import evaluation_data

    if tokenizer is None:
        raise UsageError("--prompt embedded needs a model with a tokenizer")
    windows = evaluation_data(tokenizer, "embedded", config.prompt_len, config.batch)
    rows = windows.repeat((config.batch + len(windows) - 1) // len(windows), 1)[: config.batch]
    return rows.clamp_(max=vocab_size - 1)


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def _versions() -> dict[str, str]:
    from llmprune.storage import library_versions

    versions = library_versions()
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        cusparselt = torch.backends.cusparselt.version()
        if cusparselt is not None:
            versions["cusparselt"] = str(cusparselt)
    return versions


def _figures(name: str, seconds: dict[str, list[float]], config: BenchConfig, weights: int) -> ModelFigures:
    median = {key: statistics.median(values) for key, values in seconds.items()}
    working = int(statistics.median(seconds["memory"]))
    return ModelFigures(
        name=name,
        prefill_tokens_per_s=config.batch * config.prompt_len / median["prefill"],
        decode_tokens_per_s_batch1=config.new_tokens / median["decode_1"],
        decode_tokens_per_s_batch=config.batch * config.new_tokens / median["decode_batch"],
        time_to_first_token_s=median["ttft"],
        peak_memory_bytes=weights + working,
        weight_bytes=weights,
        working_memory_bytes=working,
        seconds={key: values for key, values in seconds.items() if key != "memory"},
    )


def speedups(model: dict[str, list[float]], baseline: dict[str, list[float]]) -> dict[str, float]:
    """Per timed metric, median baseline seconds over median model seconds (> 1: the model is faster)."""
    return {key: statistics.median(baseline[key]) / statistics.median(model[key]) for key in METRICS}


# ---- the whole measurement ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    """A model ready to be measured."""

    name: str
    """As given (a loaded module: its class name)."""
    model: nn.Module
    tokenizer: Any = None
    """Only for ``--prompt embedded``."""


def _load(source: str | nn.Module, config: BenchConfig, device: torch.device) -> _Loaded:
    if isinstance(source, nn.Module):
        return _Loaded(type(source).__name__, source.eval())
    from llmprune.export.load import load
    from llmprune.models.loading import load_tokenizer

    model = load(source, config.dtype, str(device))  # the one loader: compressed and adaptive ones too
    tokenizer = load_tokenizer(source) if config.prompt == "embedded" else None
    return _Loaded(source, model, tokenizer)


def bench(
    config: BenchConfig | None = None,
    /,
    *,
    model: str | nn.Module | None = None,
    baseline: str | nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> BenchReport:
    """Measure prefill and decode throughput, time to first token and peak memory of a model, alternating
    with a baseline when there is one, as ``llmprune bench`` does.

    ``config`` is a ``BenchConfig``; its fields can be passed as keywords instead (``prompt_len=``,
    ``batch=``, ``sparse_kernels=``...), overriding ``config``'s. ``model`` and ``baseline`` may also be
    loaded causal LMs (measured on the device they are on). ``progress(done, total)`` is called before
    each round. Bad input raises a one-line UsageError before any model is loaded where possible.
    """
    from llmprune.jobs import configured
    from llmprune.models.loading import models_checked_once

    given = {label: value for label, value in (("model", model), ("baseline", baseline)) if value is not None}
    names = {label: value for label, value in given.items() if isinstance(value, str)}
    if isinstance(model, nn.Module):
        names["model"] = type(model).__name__  # as the settings record it
    config = configured(BenchConfig, config, {**options, **names})
    with models_checked_once():
        return _bench(config, given, progress)


def _bench(
    config: BenchConfig, given: dict[str, str | nn.Module], progress: Callable[[int, int], None] | None
) -> BenchReport:
    from llmprune.models.loading import check_model_name, resolve_device, resolve_dtype

    sources: dict[str, str | nn.Module] = {"model": given.get("model", config.model)}
    baseline = given.get("baseline", config.baseline)
    if baseline is not None:
        sources["baseline"] = baseline
    model = sources["model"]
    device = resolve_device(config.device)
    if isinstance(model, nn.Module):
        device = next(model.parameters()).device
    if config.sparse_kernels:
        dtype = None if isinstance(model, nn.Module) else resolve_dtype(config.dtype, device)
        require_sparse_kernels(device, dtype, config.kernel_backend)  # before loading anything
    for source in sources.values():  # every name first: a typo in the second fails before any conversion
        if isinstance(source, str):
            check_model_name(source, tokenizer=config.prompt == "embedded")
    for label, source in sources.items():  # before loading anything
        name = source if isinstance(source, str) else f"the {label}"
        model_config = source.config if isinstance(source, nn.Module) else _read_config(source)
        check_context(name, model_config, config.prompt_len, config.new_tokens)

    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _measure(config, sources, device, progress)
    finally:
        torch.set_num_threads(threads)


def _measure(
    config: BenchConfig,
    sources: dict[str, str | nn.Module],
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> BenchReport:
    measured = _load(sources["model"], config, device)
    kernels: SparseKernelsReport | None = None
    if config.sparse_kernels:  # before the baseline is loaded: a model with no sparse layer stops here
        kernels = use_sparse_kernels(measured.model, backend=config.kernel_backend)
    loaded = {"model": measured}
    if "baseline" in sources:
        loaded["baseline"] = _load(sources["baseline"], config, device)
    vocab = min(int(entry.model.config.vocab_size) for entry in loaded.values())
    prompt = make_prompt(config, vocab, measured.tokenizer).to(device)

    def round_of(module: nn.Module) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            with peak_working_memory(device) as peak:
                seconds = measure_round(module, prompt, config.new_tokens, device)
            return {**seconds, "memory": float(peak[0])}

        return run

    samples, order = alternate(
        {label: round_of(entry.model) for label, entry in loaded.items()},
        config.warmup,
        config.repeats,
        progress,
    )
    figures = {
        label: _figures(entry.name, samples[label], config, model_bytes(entry.model))
        for label, entry in loaded.items()
    }
    first = next(p for p in measured.model.parameters() if p.is_floating_point())
    result = BenchReport(
        device=_describe_device(device),
        dtype=str(first.dtype).removeprefix("torch."),
        settings=config.model_dump(mode="json"),
        versions=_versions(),
        memory_method=memory_method(device),
        model=figures["model"],
        baseline=figures.get("baseline"),
        order=order,
        kernels=None if kernels is None else asdict(kernels),
    )
    if "baseline" in figures:
        result.speedup = speedups(samples["model"], samples["baseline"])
        memory = figures["baseline"].peak_memory_bytes / figures["model"].peak_memory_bytes
        result.speedup["peak_memory"] = memory
    return result
