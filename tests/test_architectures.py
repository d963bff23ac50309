"""Every supported family end to end on tiny random models: what gets pruned, how sparse, save and reload.

The linear layers expected to be pruned are found here independently of ``llmprune.models.architecture``:
every ``nn.Linear`` / GPT-2 ``Conv1D`` under a hand-written decoder-layer prefix per family.
"""

from __future__ import annotations

import copy
import functools
import json
import re

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import llmprune
from conftest import tiny_calibration, tiny_model
from llmprune.export.save import save_pruned
from llmprune.models import architecture
from llmprune.storage import METADATA_FILE

LAYER_PREFIX = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}
# Linear layers per decoder layer, counted by hand from each family's modelling code.
LINEARS_PER_LAYER = {
    "llama": 7,  # q k v o gate up down
    "mistral": 7,
    "qwen2": 7,
    "gemma2": 7,
    "phi3": 4,  # qkv_proj o_proj gate_up_proj down_proj
    "opt": 6,  # q k v out_proj fc1 fc2
    "gpt2": 4,  # c_attn attn.c_proj c_fc mlp.c_proj (Conv1D)
    "gpt_neox": 4,  # query_key_value dense dense_h_to_4h dense_4h_to_h
}
NUM_LAYERS = 3
METHODS = ["magnitude", "wanda", "sparsegpt"]
PATTERNS = ["unstructured", "2:4"]


def decoder_linears(model: nn.Module, family: str) -> dict[str, nn.Module]:
    """Every Linear/Conv1D inside a decoder layer, by full name, from ``named_modules`` alone."""
    inside = re.compile(rf"^{re.escape(LAYER_PREFIX[family])}\.\d+\.")
    return {
        name: module
        for name, module in model.named_modules()
        if inside.match(name) and isinstance(module, nn.Linear | Conv1D)
    }


def out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in]: GPT-2's Conv1D stores [in, out]."""
    weight = module.weight.detach()
    return weight.t() if isinstance(module, Conv1D) else weight


@functools.cache
def pruned(family: str, method: str, pattern: str, true_sequential: bool = False):
    """(dense copy, pruned model, report), pruned once per session; tests must not modify them."""
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    calibration = tiny_calibration()
    # One batch, as true_sequential uses: statistics then sum in the same order, bit for bit.
    report = llmprune.prune(
        model,
        calibration,
        method=method,
        pattern=pattern,
        true_sequential=true_sequential,
        batch_size=len(calibration),
    )
    return dense, model, report


def call_order(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """Names of ``modules`` in the order a forward pass of ``model`` first calls them."""
    order: list[str] = []
    handles = [
        module.register_forward_pre_hook(
            lambda *_, name=name: order.append(name) if name not in order else None
        )
        for name, module in modules.items()
    ]
    try:
        with torch.no_grad():
            model(tiny_calibration(nsamples=1, seqlen=8))
    finally:
        for handle in handles:
            handle.remove()
    return order


def assert_target_sparsity(module: nn.Module, method: str, pattern: str, name: str) -> None:
    weight = out_in(module)
    zeros = weight == 0
    rows, cols = weight.shape
    if pattern == "2:4":
        per_group = zeros.reshape(rows, cols // 4, 4).sum(dim=2)
        assert bool((per_group == 2).all()), f"{name}: 2:4 groups along the input dimension violated"
    elif method == "wanda":
        per_row = zeros.sum(dim=1)
        assert bool((per_row == cols // 2).all()), f"{name}: rows not exactly half zeros: {per_row.tolist()}"
    else:
        assert int(zeros.sum()) == rows * cols // 2, f"{name}: {int(zeros.sum())} zeros of {rows * cols}"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
def test_prunes_every_decoder_linear_and_nothing_else(family, method, pattern):
    dense, model, report = pruned(family, method, pattern)
    linears = decoder_linears(model, family)
    assert len(linears) == NUM_LAYERS * LINEARS_PER_LAYER[family]
    assert sorted(r.name for r in report.layers) == sorted(linears)
    assert [r.layer for r in report.layers] == sorted(r.layer for r in report.layers)

    for r in report.layers:
        module = linears[r.name]
        assert_target_sparsity(module, method, pattern, r.name)
        achieved = float((out_in(module) == 0).float().mean())
        assert r.achieved_sparsity == pytest.approx(achieved, abs=1e-12)
        assert r.target_sparsity == pytest.approx(0.5)
        assert r.shape == tuple(out_in(module).shape)
        assert r.layer == int(r.name.removeprefix(LAYER_PREFIX[family] + ".").split(".")[0])
    assert report.achieved_sparsity == pytest.approx(0.5, abs=1e-9)

    # Everything except the weights of those linear layers is untouched: embeddings, lm_head, norms, biases.
    targets = {f"{name}.weight" for name in linears}
    dense_params = dict(dense.named_parameters())
    for name, param in model.named_parameters():
        if name not in targets:
            assert torch.equal(param, dense_params[name]), f"{name} changed"
    assert torch.equal(model.get_output_embeddings().weight, dense.get_output_embeddings().weight)
    assert torch.equal(model.get_input_embeddings().weight, dense.get_input_embeddings().weight)

    with torch.no_grad():
        logits = model(tiny_calibration(nsamples=2, seed=1)).logits
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize(("method", "pattern"), [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_saved_model_reloads_with_plain_transformers(family, method, pattern, tmp_path):
    _, model, report = pruned(family, method, pattern)
    output = save_pruned(model, None, tmp_path / "out", {"method": method, "report": report.to_dict()})
    assert json.loads((output / METADATA_FILE).read_text())["method"] == method
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    assert type(reloaded) is type(model)
    tokens = tiny_calibration(nsamples=2, seed=1)
    with torch.no_grad():
        expected, got = model(tokens).logits, reloaded(tokens).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)

    saved = decoder_linears(reloaded, family)
    for name, module in decoder_linears(model, family).items():
        assert saved[name].weight.dtype == module.weight.dtype
        assert torch.equal(saved[name].weight == 0, module.weight == 0), f"{name}: zeros differ after reload"
        assert torch.equal(saved[name].weight, module.weight)


@pytest.mark.parametrize("method", METHODS)
def test_true_sequential(family, method):
    _, default, _ = pruned(family, method, "unstructured")
    dense, model, report = pruned(family, method, "unstructured", true_sequential=True)
    linears = decoder_linears(model, family)
    assert sorted(r.name for r in report.layers) == sorted(linears)
    for name, module in linears.items():
        assert_target_sparsity(module, method, "unstructured", name)

    others = decoder_linears(default, family)
    order = call_order(dense, decoder_linears(dense, family))
    assert sorted(order) == sorted(linears)
    same = [torch.equal(linears[name].weight, others[name].weight) for name in order]
    if method == "magnitude":
        assert all(same), "magnitude ignores activations, so true_sequential must not change it"
    else:
        # The first linear layer called sees the same inputs either way; later ones see pruned sublayers'.
        assert same[0], f"{order[0]}: its inputs do not depend on true_sequential"
        assert not all(same), "true_sequential gave exactly the default weights"

    with torch.no_grad():
        logits = model(tiny_calibration(nsamples=2, seed=1)).logits
    assert bool(torch.isfinite(logits).all())


def test_architecture_helpers_agree_with_the_modules(family):
    """read_weight is the [out, in] view of the stored weight and input_width its number of columns."""
    model = tiny_model(family)
    for name, module in decoder_linears(model, family).items():
        view = architecture.read_weight(module)
        assert torch.equal(view, out_in(module)), name
        assert architecture.input_width(module) == view.shape[1] == out_in(module).shape[1], name
        assert view.data_ptr() == module.weight.data_ptr(), f"{name}: read_weight must be a view"
    assert architecture.decoder_layers(model)[0] == LAYER_PREFIX[family]


def test_each_layer_is_fed_what_the_pruned_model_computes(family):
    """The driver's layer-by-layer pass matches the pruned model's own forward pass, layer by layer.

    Catches captured call arguments (masks, rotary embeddings, sliding windows) going to the wrong layer.
    """
    model = tiny_model(family)
    layers = model.get_submodule(LAYER_PREFIX[family])
    calibration = tiny_calibration()  # 32 tokens: beyond the 16-token sliding windows of mistral and gemma2
    received: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: received[i].append(
                (args[0] if args else kwargs["hidden_states"]).detach().clone()
            ),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    try:
        llmprune.prune(model, calibration, method="wanda", batch_size=5)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        expected = model(calibration, output_hidden_states=True).hidden_states
    for i in range(len(layers)):
        fed = torch.cat(received[i][-2:])  # the last call of each batch (5 + 3 samples)
        assert torch.allclose(fed, expected[i], rtol=1e-5, atol=1e-5), f"layer {i}"
