"""Shared fixtures and helpers: tiny randomly initialised models of every supported family, saved
checkpoints and text files for the command line, and running it in this process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

# The tests never need the network: fail fast and quietly on any hub access.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedModel,
    Qwen2Config,
)

VOCAB = 128

# Widths are multiples of 8 so that 2:4 and 4:8 patterns apply to every linear layer. Every family has the
# same shape; each config takes the keywords it knows (GPT-2 names them its own way).
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}
GQA_SHAPE = {**SHAPE, "intermediate_size": 128, "num_key_value_heads": 2}
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**GQA_SHAPE),
    "mistral": lambda: MistralConfig(**GQA_SHAPE, sliding_window=16),
    "qwen2": lambda: Qwen2Config(**GQA_SHAPE),
    "gemma2": lambda: Gemma2Config(**GQA_SHAPE, head_dim=16, sliding_window=16),
    "phi3": lambda: Phi3Config(**GQA_SHAPE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "opt": lambda: OPTConfig(**SHAPE, ffn_dim=128, word_embed_proj_dim=64),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
    ),
    "gpt_neox": lambda: GPTNeoXConfig(**SHAPE, intermediate_size=128),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of ``family`` in eval mode (deterministic for a seed)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS[family]()).eval()


ERROR = "llmprune: error: "


class CliResult(NamedTuple):
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The single stderr line of a failed run (asserting it is the only one)."""
        assert self.code == 2, self
        assert "Traceback" not in self.err, self.err
        lines = self.err.removesuffix("\n").splitlines()
        assert len(lines) == 1, self.err  # no blank line either (a progress bar's leftovers)
        assert lines[0].startswith(ERROR), self.err
        return lines[0]


def invoke(capsys, *args) -> CliResult:
    """Run ``llmprune ARGS`` in this process; exit code, stdout and stderr."""
    from llmprune.cli.main import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Default outputs (./pruned-..., ./finetuned-..., ./sweep) land in a temporary directory (modules of
    command-line tests use it for every test: ``pytestmark = pytest.mark.usefixtures("in_tmp")``)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any model is loaded: the transformers loaders and every llmprune module that loads
    one are refused (for checks that must come before any expensive work)."""
    import llmprune.api
    import llmprune.sweeps.runner
    import llmprune.training.finetuning
    from llmprune.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for model_class in (PreTrainedModel, AutoModelForCausalLM):
        monkeypatch.setattr(model_class, "from_pretrained", refuse)
    for module in (loading, llmprune.api, llmprune.sweeps.runner, llmprune.training.finetuning):
        monkeypatch.setattr(module, "load_plain_model", refuse)


def tiny_llama_for(tokenizer, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama (hidden 32, GQA) whose vocabulary matches a real ``tokenizer``, for tests that
    run the command line or lm-eval on text."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (converted from its GGUF once, then cached)."""
    import llmprune

    return llmprune.load_tokenizer("smollm2")


def save_tiny_llama(directory: Path, tokenizer, nan_in: str | None = None, layers: int = 2) -> Path:
    """A tiny Llama (``tiny_llama_for``) saved with the tokenizer; ``nan_in`` names a linear layer whose
    first weight is made NaN."""
    model = tiny_llama_for(tokenizer, layers)
    if nan_in is not None:
        with torch.no_grad():
            model.get_submodule(nan_in).weight[0, 0] = float("nan")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_text(path: Path) -> Path:
    """A text file of the embedded text's first 20 000 characters: calibration or evaluation data."""
    from llmprune.data.text import embedded_text

    path.write_text(embedded_text()[:20_000], encoding="utf-8")
    return path


def prune_args(files, *extra: str) -> list[str]:
    """``llmprune prune`` of ``files["model"]`` on ``files["text"]``: 4×16 tokens, evaluated on 2×16."""
    return [
        "prune",
        "--model",
        files["model"],
        "--calibration",
        files["text"],
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--eval-data",
        files["text"],
        "--eval-nsamples",
        "2",
        "--eval-seqlen",
        "16",
        *extra,
    ]


def tiny_calibration(nsamples: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (nsamples, seqlen), generator=generator)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def family(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _threads_for_size(request):
    """Tiny models run fastest on one thread; the real model (``slow``) gets every core."""
    before = torch.get_num_threads()
    torch.set_num_threads(before if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(before)


# --- structured pruning: shared by test_structured.py and test_adaptive.py ---------------------------------

EVAL_TOKENS = tiny_calibration(nsamples=2, seqlen=16, seed=7)
"""Token ids the structured tests compare logits on (not the calibration data)."""


def logits(model: torch.nn.Module) -> torch.Tensor:
    """The model's logits on ``EVAL_TOKENS``."""
    with torch.no_grad():
        return model(EVAL_TOKENS).logits


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖, computed in float64."""
    return float((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


@pytest.fixture
def kernels_available(monkeypatch):
    """The compiled CPU kernels count as built (their torch reference runs where they are not)."""
    from llmprune.inference import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "native_problem", lambda: None)


def structured_prune_args(source, text, output, *options) -> list[str]:
    """``llmprune prune`` of ``source`` with structured pruning: 4 x 16 calibration tokens and 2 x 16
    evaluation tokens from the text file ``text``, then ``options``."""
    args = ["prune", "--model", source, "--calibration", text, "--eval-data", text, "--nsamples", "4"]
    args += ["--seqlen", "16", "--eval-nsamples", "2", "--eval-seqlen", "16", "--pattern", "structured"]
    return [str(a) for a in [*args, *options, "--output", output]]
