"""``llmprune.load``, the one loader: plain, pruned, compressed and adaptive-width checkpoints give back the
model that was saved; the old names still work, with a DeprecationWarning."""

from __future__ import annotations

import warnings

import pytest
import torch

import llmprune
from conftest import tiny_calibration, tiny_model
from llmprune.export.save import save_pruned
from llmprune.structured.checkpoint import layer_widths

EVAL = tiny_calibration(nsamples=2, seqlen=16, seed=7)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(EVAL).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, object]]:
    """Each kind of checkpoint, with the model it was saved from."""
    root = tmp_path_factory.mktemp("load")
    plain = tiny_model("llama")
    plain.save_pretrained(root / "plain")
    pruned = tiny_model("llama", seed=1)
    llmprune.prune(pruned, tiny_calibration(), method="wanda", pattern="2:4")
    save_pruned(pruned, None, root / "pruned", {})
    adaptive = tiny_model("qwen2")
    options = {"units": "heads,channels", "widths": "adaptive", "sparsity": 0.4}
    llmprune.prune(adaptive, tiny_calibration(), pattern="structured", **options)
    assert layer_widths(adaptive) is not None  # the layers differ: from_pretrained cannot build it
    save_pruned(adaptive, None, root / "adaptive", {})
    return {
        "plain": (plain, root / "plain"),
        "pruned": (pruned, root / "pruned"),
        "compressed": (pruned, llmprune.compress(root / "pruned", root / "compressed")),
        "adaptive": (adaptive, root / "adaptive"),
    }


@pytest.mark.parametrize("kind", ["plain", "pruned", "compressed", "adaptive"])
def test_load_gives_back_the_saved_model(saved, kind):
    model, path = saved[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the one loader warns about nothing
        loaded = llmprune.load(str(path), dtype="float32", device="cpu")
    assert not loaded.training
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    assert {name: tensor.shape for name, tensor in loaded.state_dict().items()} == shapes
    assert torch.equal(logits(loaded), logits(model))


def test_load_model_is_a_deprecated_name_of_load(saved):
    model, path = saved["compressed"]
    deprecated = r"llmprune\.load_model is deprecated.*llmprune\.load"
    with pytest.warns(DeprecationWarning, match=deprecated) as caught:
        loaded = llmprune.load_model(str(path), "float32", "cpu")
    assert [w.category for w in caught].count(DeprecationWarning) == 1  # by the name, not again by the call
    assert torch.equal(logits(loaded), logits(model))  # the old name opens compressed checkpoints too now


def test_load_embedded_model_is_deprecated_and_still_returns_model_and_tokenizer(monkeypatch):
    from llmprune.export import load as module

    monkeypatch.setattr(module, "load", lambda name, dtype, device: ("model", name, dtype, device))
    monkeypatch.setattr(module, "load_tokenizer", lambda name: ("tokenizer", name))
    with pytest.warns(DeprecationWarning, match="load_embedded_model is deprecated"):
        model, tokenizer = llmprune.load_embedded_model()
    assert model == ("model", "smollm2", "float32", "cpu") and tokenizer == ("tokenizer", "smollm2")
