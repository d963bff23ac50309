"""The sparse-kernel swap on the CPU (``llmprune.use_sparse_kernels`` picking the CPU kernels) and
``llmprune bench --sparse-kernels --device cpu``, on tiny models.

Every swapped layer is checked against ``F.linear`` of its dense-with-zeros weight, and the swapped model
against the dense-with-zeros model (logits, greedy tokens, a transformers pipeline). The swap refuses to
run without the compiled kernels; the ``kernels_available`` fixture lifts that refusal, so these tests run
the compiled kernels where they are built and ``cpu_kernels``' torch reference (same results) where not:
they test the swap, ``test_cpu_kernels.py`` the kernels.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

import llmprune
from conftest import VOCAB, invoke, relative_error, tiny_calibration, tiny_llama_for, tiny_model
from llmprune.errors import UsageError
from llmprune.inference import cpu_kernels
from llmprune.inference.kernels import BACKENDS, classify, model_bytes, require_sparse_kernels
from llmprune.inference.sparse_linear import SPARSE_TOKENS, SparseLinear

BREAK_EVEN = "is below the kernels' break-even of 30%"


def pruned(family: str = "llama", tie: bool = False, dtype=torch.float32, **options) -> torch.nn.Module:
    """A tiny model magnitude-pruned (50 % unstructured unless ``options`` say otherwise)."""
    model = tiny_model(family)
    if tie and family != "gpt2":  # GPT-2 ties its LM head already
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    llmprune.prune(model, tiny_calibration(2, 8), method="magnitude", **options)
    return model.to(dtype)


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a Linear or (transposed) GPT-2 Conv1D."""
    weight = module.weight.detach()
    return weight.t() if isinstance(module, Conv1D) else weight



def decoder_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D) and n != "lm_head"]


# ---- classification and the swap ----------------------------------------------------------------------


def test_classify_keeps_too_dense_and_tied_layers_with_the_reason():
    model = pruned(tie=True)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.normal_()  # dense again
    choices = {c.name: c for c in classify(model, "cpu")}
    assert set(choices) == {*decoder_linears(model), "lm_head"}
    ineligible = {name: c.reasons for name, c in choices.items() if not c.eligible}
    assert ineligible == {
        "model.layers.1.mlp.up_proj": (f"sparsity 0% {BREAK_EVEN}",),
        "lm_head": (f"sparsity 0% {BREAK_EVEN}", "weight shared with model.embed_tokens"),
    }
    assert choices["model.layers.1.mlp.up_proj"].sparsity == 0.0
    assert choices["model.layers.0.self_attn.k_proj"].shape == (32, 64)
    assert choices["model.layers.0.self_attn.k_proj"].sparsity == pytest.approx(0.5, abs=0.01)


def test_swap_replaces_eligible_layers_and_drops_the_dense_weights(kernels_available):
    model = pruned()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.normal_()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    before = model_bytes(model)
    expected = [n for n in decoder_linears(model) if n != "model.layers.1.mlp.up_proj"]
    report = llmprune.use_sparse_kernels(model)
    assert report.backend == "cpu" and report.swapped == expected
    assert [c.name for c in report.skipped] == ["model.layers.1.mlp.up_proj", "lm_head"]
    for name in expected:
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseLinear) and not hasattr(layer, "weight")
        assert torch.equal(layer.dense_weight(), dense[name])
    assert type(model.get_submodule("model.layers.1.mlp.up_proj")) is torch.nn.Linear
    assert [n for n, _ in model.named_parameters() if n.endswith("_proj.weight")] == [
        "model.layers.1.mlp.up_proj.weight"
    ]
    # What is stored: parameters + buffers, the swapped layers as values + mask + offsets.
    tensors = [*model.parameters(), *model.buffers()]
    assert model_bytes(model) == sum(t.numel() * t.element_size() for t in tensors) < before
    summary = report.summary()
    assert summary.startswith(
        f"sparse kernels on cpu ({cpu_kernels.isa()}, 1 thread): 20 linear layers swapped, 2 left dense: "
    )
    assert f"model.layers.1.mlp.up_proj (sparsity 0% {BREAK_EVEN})" in summary


def test_swapped_layers_equal_f_linear_of_the_dense_weight(kernels_available):
    model = pruned()
    layers = {n: model.get_submodule(n) for n in decoder_linears(model)}
    weights = {n: (m.weight.detach().clone(), m.bias) for n, m in layers.items()}
    llmprune.use_sparse_kernels(model, backend="cpu")
    generator = torch.Generator().manual_seed(3)
    for name, (weight, bias) in weights.items():
        layer = model.get_submodule(name)
        for tokens in (1, SPARSE_TOKENS, 3 * SPARSE_TOKENS):
            x = torch.randn(2, tokens, 2 * weight.shape[1], generator=generator)[..., ::2]  # non-contiguous
            assert relative_error(layer(x), F.linear(x, weight, bias)) <= 1e-5, (name, tokens)


def test_gpt2_conv1d_layers_are_swapped_transposed(kernels_available):
    model = pruned("gpt2")
    weights = {n: linear_weight(m).clone() for n, m in model.named_modules() if isinstance(m, Conv1D)}
    biases = {n: m.bias.detach().clone() for n, m in model.named_modules() if isinstance(m, Conv1D)}
    report = llmprune.use_sparse_kernels(model)
    assert report.swapped == list(weights) and len(weights) == 12
    assert [(c.name, c.reasons[-1]) for c in report.skipped] == [
        ("lm_head", "weight shared with transformer.wte")
    ]
    generator = torch.Generator().manual_seed(0)
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        x = torch.randn(5, weight.shape[1], generator=generator)
        assert isinstance(layer, SparseLinear) and (layer.out_features, layer.in_features) == weight.shape
        assert relative_error(layer(x), F.linear(x, weight, biases[name])) <= 1e-5


@pytest.mark.parametrize(("family", "options"), [("llama", {}), ("llama", {"pattern": "2:4"}), ("gpt2", {})])
def test_swapped_model_generates_as_the_dense_model(kernels_available, family, options):
    model = pruned(family, **options)
    dense = copy.deepcopy(model)
    llmprune.use_sparse_kernels(model)
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(model(prompt).logits, dense(prompt).logits) <= 1e-5
    kwargs = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 6, "do_sample": False}
    assert torch.equal(model.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))


def test_bfloat16_model_swaps_every_eligible_layer(kernels_available):
    model = pruned(dtype=torch.bfloat16)
    dense = copy.deepcopy(model)
    report = llmprune.use_sparse_kernels(model)
    assert report.swapped == decoder_linears(dense)  # none put back by the check
    assert model.model.layers[0].mlp.up_proj.values.dtype == torch.bfloat16
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(model(prompt).logits, dense(prompt).logits) <= 2e-2  # bf16 activations


def test_text_generation_pipeline_on_the_swapped_model(kernels_available, tokenizer):
    from transformers import pipeline

    model = tiny_llama_for(tokenizer)
    llmprune.prune(model, tiny_calibration(2, 8), method="magnitude")
    dense = copy.deepcopy(model)
    llmprune.use_sparse_kernels(model)
    options = {"max_new_tokens": 5, "do_sample": False}
    texts = [pipeline("text-generation", model=m, tokenizer=tokenizer, device="cpu")("The cat", **options)
             for m in (model, dense)]  # fmt: skip
    assert texts[0] == texts[1] and texts[0][0]["generated_text"].startswith("The cat")


def test_a_layer_whose_kernel_output_differs_is_put_back(kernels_available, monkeypatch):
    model = pruned()
    wrong = SparseLinear.from_dense

    def flipped(weight, bias=None):
        return wrong(weight.flip(1), bias)

    monkeypatch.setattr(SparseLinear, "from_dense", flipped)
    report = llmprune.use_sparse_kernels(model)
    assert report.swapped == []
    reason = {c.name: c.reasons for c in report.skipped}["model.layers.0.mlp.up_proj"]
    assert len(reason) == 1 and reason[0].endswith("relative error of the sparse kernel is too large")
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


# ---- bad input ----------------------------------------------------------------------------------------


def test_a_model_with_no_sparse_layer_names_the_layers_and_their_sparsity(kernels_available):
    model = tiny_model("llama")
    with pytest.raises(UsageError) as error:
        llmprune.use_sparse_kernels(model)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"no linear layer can use the CPU sparse kernels (22 checked): model.layers.0.self_attn.q_proj "
        f"(sparsity 0% {BREAK_EVEN}), "
    )
    assert message.endswith(" and 17 more")
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("_proj"))


def test_float16_is_not_taken_by_the_cpu_kernels(kernels_available):
    with pytest.raises(UsageError) as error:
        llmprune.use_sparse_kernels(pruned(dtype=torch.float16))
    assert str(error.value).startswith(
        "no linear layer can use the CPU sparse kernels (22 checked): model.layers.0.self_attn.q_proj "
        "(dtype float16 (the CPU kernels take float32, bfloat16)), "
    )
    with pytest.raises(UsageError) as error:
        require_sparse_kernels(torch.device("cpu"), torch.float16)
    assert str(error.value) == "the CPU sparse kernels take float32 or bfloat16 weights, not float16"


def test_missing_compiled_kernels_are_refused_in_one_line(monkeypatch):
    missing = "the compiled kernels are missing: reinstall"
    monkeypatch.setattr(cpu_kernels, "native_problem", lambda: missing)
    model = pruned()
    with pytest.raises(UsageError) as error:
        llmprune.use_sparse_kernels(model)
    assert str(error.value) == missing
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    with pytest.raises(UsageError) as error:
        require_sparse_kernels(torch.device("cpu"), torch.float32)
    assert str(error.value) == missing


def test_backends(kernels_available):
    assert BACKENDS == ("cusparselt", "cutlass", "cpu")
    assert require_sparse_kernels(torch.device("cpu")) == "cpu"
    assert require_sparse_kernels(torch.device("cpu"), torch.bfloat16, "cpu") == "cpu"
    with pytest.raises(UsageError, match=r"^2:4 sparse kernels need an NVIDIA GPU .*; this run is on cpu$"):
        require_sparse_kernels(torch.device("cpu"), None, "cutlass")
    with pytest.raises(UsageError) as error:
        llmprune.use_sparse_kernels(pruned(), backend="gpu")
    assert str(error.value) == "backend must be auto, cusparselt, cutlass, cpu, got 'gpu'"
    with pytest.raises(UsageError, match="does not apply to backend cpu"):
        llmprune.use_sparse_kernels(pruned(), backend="cpu", convert=lambda w: w)


# ---- llmprune bench --sparse-kernels --device cpu ------------------------------------------------------

SMALL = ["--prompt-len", "8", "--batch", "1", "--new-tokens", "2", "--repeats", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu-bench")
    pruned().save_pretrained(root / "pruned")
    tiny_model("llama").save_pretrained(root / "dense")
    return root


def test_cli_bench_swaps_model_and_keeps_the_baseline_dense(capsys, saved, kernels_available):
    args = ["bench", saved / "pruned", "--baseline", saved / "pruned", "--sparse-kernels", "--device", "cpu"]
    result = invoke(capsys, *args, *SMALL, "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    kernels = data["kernels"]
    assert kernels["backend"] == "cpu" and kernels["isa"] == cpu_kernels.isa() and kernels["threads"] >= 1
    assert len(kernels["swapped"]) == 21 and kernels["swapped"][0] == "model.layers.0.self_attn.q_proj"
    assert [c["name"] for c in kernels["skipped"]] == ["lm_head"]
    assert data["model"]["weight_bytes"] < data["baseline"]["weight_bytes"]  # values + bits, not dense
    table = invoke(capsys, *args, *SMALL)
    assert table.code == 0, table.err
    assert "linear layers on sparse kernels" in table.out and "21 of 22" in table.out
    assert "0 (dense)" in table.out
    assert "MODEL: sparse kernels on cpu (" in table.out
    assert "21 linear layers swapped, 1 left dense: lm_head" in table.out


def test_cli_bench_sparse_kernels_without_a_baseline(capsys, saved, kernels_available):
    result = invoke(capsys, "bench", saved / "pruned", "--sparse-kernels", "--device", "cpu", *SMALL)
    assert result.code == 0, result.err
    assert "21 of 22" in result.out and "speedup" not in result.out


def test_cli_bench_on_a_dense_model_names_the_layers(capsys, saved, kernels_available):
    result = invoke(capsys, "bench", saved / "dense", "--sparse-kernels", "--device", "cpu", *SMALL)
    line = result.error_line
    assert "no linear layer can use the CPU sparse kernels (22 checked): " in line
    assert f"model.layers.0.self_attn.q_proj (sparsity 0% {BREAK_EVEN})" in line


@pytest.mark.parametrize(
    ("args", "message", "built"),
    [
        (["--device", "cpu"], "the compiled kernels are missing: reinstall", 0),
        (["--dtype", "float16"], "the CPU sparse kernels take float32 or bfloat16 weights, not float16", 1),
        (["--kernel-backend", "cutlass", "--device", "cpu"], "2:4 sparse kernels need an NVIDIA GPU", 1),
    ],
)
def test_cli_bench_sparse_kernels_bad_input_before_loading(
    capsys, saved, no_model_loading, monkeypatch, args, message, built
):
    monkeypatch.setattr(cpu_kernels, "native_problem", lambda: None if built else message)
    result = invoke(capsys, "bench", saved / "pruned", "--sparse-kernels", *args)
    assert message in result.error_line
