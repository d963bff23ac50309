"""``llmprune bench`` and the 2:4 sparse-kernel swap (``llmprune.use_sparse_kernels``), on the CPU with tiny
models.

The sparse kernels themselves need an NVIDIA GPU of compute capability 8.0+; here the eligibility rules,
the swap bookkeeping (with a stand-in conversion), the refusal without such a GPU, and the measurement
protocol (alternation, medians, ratios) are tested. ``benchmarks/sparse_kernels_gpu.py`` runs the kernels.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

import llmprune
from conftest import VOCAB, invoke, tiny_model
from llmprune.errors import UsageError
from llmprune.inference import bench as bench_module
from llmprune.inference.bench import alternate, decode, peak_working_memory, prefill, speedups
from llmprune.inference.cuda_kernels import ineligibility, shape_limits
from llmprune.inference.kernels import classify
from llmprune.methods.patterns import n_m_violations

# ---- eligibility ----------------------------------------------------------------------------------------


def two_four(rows: int, cols: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    """A random weight with exactly 2 non-zeros in every group of 4 inputs (positions vary by group)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) + 3.0  # no accidental zeros
    keep = torch.rand(rows, cols // 4, 4, generator=generator).argsort(dim=-1) < 2
    return (weight * keep.reshape(rows, cols)).to(dtype)


def test_n_m_violations_matches_counting_by_hand():
    weight = two_four(8, 16, torch.float32)
    weight[3, 9] = weight[3, 10] = weight[3, 11] = weight[3, 8] = 1.0  # row 3, group 2: 4 non-zeros
    weight[5, 0:4] = torch.tensor([0.0, 0.0, 0.0, 7.0])  # fewer than 2 is still valid
    expected = torch.tensor(
        [[(weight[r, 4 * g : 4 * g + 4] != 0).sum() > 2 for g in range(4)] for r in range(8)]
    )
    assert torch.equal(n_m_violations(weight, 2, 4), expected)
    assert expected.sum() == 1 and expected[3, 2]


def test_shape_limits_are_pytorchs():
    # torch/sparse/semi_structured.py, _DTYPE_SHAPE_CONSTRAINTS (sparse_min_rows, sparse_min_cols)
    assert shape_limits("cutlass", torch.float16) == (32, 64)
    assert shape_limits("cutlass", torch.bfloat16) == (32, 64)
    assert shape_limits("cusparselt", torch.float16) == (16, 16)
    assert shape_limits("cusparselt", torch.bfloat16) == (16, 16)


@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
def test_valid_two_four_weight_is_eligible(backend):
    assert ineligibility(two_four(64, 128), backend) == []
    assert ineligibility(two_four(96, 64, torch.bfloat16), backend) == []
    assert ineligibility(torch.zeros(32, 64, dtype=torch.float16), backend) == []  # all-zero groups: valid


def test_one_violating_group_is_found_and_located():
    weight = two_four(64, 128)
    group = weight[17, 40:44]
    group[group == 0] = 1.0  # row 17, inputs 40-43 now hold 4 non-zeros
    assert ineligibility(weight, "cutlass") == [
        "not 2:4: 1 of 2048 groups of 4 inputs hold more than 2 non-zeros (first: row 17, inputs 40-43)"
    ]


def test_wrong_dtype_is_the_only_reason():
    assert ineligibility(two_four(64, 128, torch.float32), "cutlass") == [
        "dtype float32 (the kernels take float16, bfloat16)"
    ]


def test_shapes_each_backend_refuses():
    # 48 rows: a multiple of 16 (cuSPARSELt) but not of 32 (CUTLASS); 80 inputs: of 16 but not of 64.
    assert ineligibility(two_four(48, 128), "cusparselt") == []
    assert ineligibility(two_four(48, 128), "cutlass") == [
        "shape 48×128: cutlass needs rows a multiple of 32 and inputs a multiple of 64"
    ]
    assert ineligibility(two_four(64, 80), "cusparselt") == []
    assert ineligibility(two_four(64, 80), "cutlass") == [
        "shape 64×80: cutlass needs rows a multiple of 32 and inputs a multiple of 64"
    ]
    assert ineligibility(two_four(64, 72), "cusparselt") == [
        "shape 64×72: cusparselt needs rows a multiple of 16 and inputs a multiple of 16"
    ]
    odd = torch.ones(32, 66, dtype=torch.float16)
    assert ineligibility(odd, "cusparselt") == [
        "66 inputs are not a multiple of 4",
        "shape 32×66: cusparselt needs rows a multiple of 16 and inputs a multiple of 16",
    ]


def two_four_llama(tie: bool = False) -> torch.nn.Module:
    """The tiny Llama, decoder layers magnitude-pruned to 2:4, in float16."""
    model = tiny_model("llama")
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    llmprune.prune(model, torch.zeros(1, 8, dtype=torch.long), method="magnitude", pattern="2:4")
    return model.half()


def decoder_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def test_classify_reports_every_ineligible_layer():
    model = two_four_llama(tie=True)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(1.0)  # dense: fails the pattern
    choices = {c.name: c for c in classify(model, "cutlass")}
    assert set(choices) == {*decoder_linears(model), "lm_head"}
    ineligible = {name: c.reasons for name, c in choices.items() if not c.eligible}
    assert set(ineligible) == {"model.layers.1.mlp.up_proj", "lm_head"}
    assert ineligible["model.layers.1.mlp.up_proj"][0].startswith("not 2:4: 2048 of 2048 groups")
    assert ineligible["lm_head"][-1] == "weight shared with model.embed_tokens"
    assert choices["model.layers.0.self_attn.k_proj"].shape == (32, 64)


def test_sparse_kernels_swaps_eligible_layers_and_lists_the_rest():
    model = two_four_llama()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[0, :4] = 1.0
    converted = []

    def stand_in(weight: torch.Tensor) -> torch.Tensor:  # the CPU has no sparse kernel: keep it dense
        converted.append(weight.shape)
        return weight.clone()

    report = llmprune.use_sparse_kernels(model, backend="cutlass", convert=stand_in)
    expected = [n for n in decoder_linears(model) if n != "model.layers.2.self_attn.o_proj"]
    assert report.swapped == expected
    assert len(converted) == len(expected)
    skipped = {c.name: c.reasons for c in report.skipped}
    assert set(skipped) == {"model.layers.2.self_attn.o_proj", "lm_head"}
    assert skipped["model.layers.2.self_attn.o_proj"] == (
        "not 2:4: 1 of 1024 groups of 4 inputs hold more than 2 non-zeros (first: row 0, inputs 0-3)",
    )
    assert report.summary().startswith(
        "2:4 sparse kernels (cutlass): 20 linear layers swapped, 2 left dense: "
    )


def test_sparse_kernels_puts_back_a_layer_whose_kernel_output_differs():
    model = two_four_llama()
    report = llmprune.use_sparse_kernels(model, backend="cutlass", convert=lambda w: w.flip(1).contiguous())
    assert report.swapped == []
    reasons = {c.name: c.reasons[0] for c in report.skipped}
    assert "relative error of the sparse kernel is too large" in reasons["model.layers.0.mlp.up_proj"]
    assert torch.count_nonzero(model.model.layers[0].mlp.up_proj.weight) > 0  # the dense weight is back


def test_sparse_kernels_on_a_model_that_is_not_two_four_names_the_layers():
    model = tiny_model("llama").half()
    with pytest.raises(UsageError) as error:
        llmprune.use_sparse_kernels(model, convert=lambda w: w)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("no linear layer can use the 2:4 sparse kernels (22 checked): ")
    assert "model.layers.0.self_attn.q_proj (not 2:4: " in message and "and 17 more" in message


def test_sparse_kernels_without_a_gpu_says_what_hardware_is_needed():
    with pytest.raises(UsageError) as error:  # on the CPU "auto" picks the CPU kernels: ask for 2:4
        llmprune.use_sparse_kernels(two_four_llama(), backend="cutlass")
    assert str(error.value) == (
        "2:4 sparse kernels need an NVIDIA GPU of compute capability 8.0 or newer "
        "(Ampere, Ada, Hopper, Blackwell); this run is on cpu"
    )


# ---- measurement --------------------------------------------------------------------------------------


def test_alternate_runs_models_in_turn_and_drops_warmup():
    calls = []
    scripted = {"a": iter([9.0, 1.0, 3.0, 2.0]), "b": iter([9.0, 4.0, 6.0, 5.0])}

    def round_of(label):
        def run():
            calls.append(label)
            return {"prefill": next(scripted[label])}

        return run

    seen = []
    rounds = {"a": round_of("a"), "b": round_of("b")}
    samples, order = alternate(rounds, warmup=1, repeats=3, progress=lambda *done: seen.append(done))
    assert calls == ["a", "b"] * 4
    assert seen == [(k, 8) for k in range(8)]
    assert order == ["a", "b"] * 3
    assert samples == {"a": {"prefill": [1.0, 3.0, 2.0]}, "b": {"prefill": [4.0, 6.0, 5.0]}}


def test_speedup_is_the_ratio_of_medians():
    model = {key: [1.0, 3.0, 2.0] for key in bench_module.METRICS}
    baseline = {key: [4.0, 100.0, 5.0] for key in bench_module.METRICS}
    assert speedups(model, baseline) == {key: 2.5 for key in bench_module.METRICS}


def test_decode_loop_is_greedy_generation_with_the_cache():
    model = tiny_model("llama")
    prompt = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    cache, first = prefill(model, prompt)
    tokens = decode(model, cache, first, 5)
    expected = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
    )
    assert torch.equal(torch.cat([first, tokens], dim=1), expected[:, 12:])


def test_peak_working_memory_sees_an_allocation():
    with peak_working_memory(torch.device("cpu")) as peak:
        block = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
        del block
    assert 15 * 2**20 <= peak[0] < 64 * 2**20


def test_bench_alternates_and_reports_every_figure():
    model, baseline = tiny_model("llama"), tiny_model("llama", seed=1)
    options = {"prompt_len": 24, "batch": 2, "new_tokens": 3, "repeats": 3, "warmup": 1}
    result = llmprune.bench(model=model, baseline=baseline, **options)
    assert result.order == ["model", "baseline"] * 3
    assert result.device.startswith("cpu") and result.dtype == "float32"
    for figures in (result.model, result.baseline):
        values = [
            figures.prefill_tokens_per_s,
            figures.decode_tokens_per_s_batch1,
            figures.decode_tokens_per_s_batch,
            figures.time_to_first_token_s,
            figures.peak_memory_bytes,
        ]
        assert all(math.isfinite(v) and v > 0 for v in values), figures
        tensors = [*model.parameters(), *model.buffers()]
        assert figures.weight_bytes == sum(t.numel() * t.element_size() for t in tensors)
        assert {key: len(v) for key, v in figures.seconds.items()} == dict.fromkeys(bench_module.METRICS, 3)
        assert figures.prefill_tokens_per_s == 2 * 24 / statistics.median(figures.seconds["prefill"])
        assert figures.decode_tokens_per_s_batch1 == 3 / statistics.median(figures.seconds["decode_1"])
    for key in bench_module.METRICS:
        ratio = statistics.median(result.baseline.seconds[key]) / statistics.median(result.model.seconds[key])
        assert result.speedup[key] == ratio


def test_bench_uses_the_clock_around_each_phase(monkeypatch):
    ticks = iter(range(0, 10_000, 2))  # every phase lasts 2 "seconds"
    monkeypatch.setattr(bench_module, "_clock", lambda: next(ticks))
    threads = torch.get_num_threads()
    options = {"prompt_len": 8, "batch": 4, "new_tokens": 2, "repeats": 2, "warmup": 0}
    result = llmprune.bench(model=tiny_model("llama"), threads=threads + 1, **options)
    assert result.device.startswith(f"cpu ({threads + 1} threads") and torch.get_num_threads() == threads
    assert result.model.prefill_tokens_per_s == 4 * 8 / 2
    assert result.model.decode_tokens_per_s_batch == 4 * 2 / 2
    assert result.model.decode_tokens_per_s_batch1 == 2 / 2
    assert result.model.time_to_first_token_s == 2
    assert result.baseline is None and result.speedup is None


def test_bench_refuses_a_prompt_longer_than_the_context():
    with pytest.raises(UsageError, match=r"--prompt-len 129 is longer than the context .* \(128 positions"):
        llmprune.bench(model=tiny_model("llama"), prompt_len=129)
    with pytest.raises(UsageError, match=r"--prompt-len 100 \+ --new-tokens 64 \(164 tokens\) is longer"):
        llmprune.bench(model=tiny_model("llama"), prompt_len=100)


# ---- command line -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tiny_model("llama").save_pretrained(root / "a")
    tiny_model("llama", seed=1).save_pretrained(root / "b")
    return root


def test_cli_bench_json(capsys, saved):
    result = invoke(
        capsys, "bench", saved / "a", "--baseline", saved / "b", "--prompt-len", "16", "--batch", "2",
        "--new-tokens", "2", "--repeats", "2", "--warmup", "0", "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["order"] == ["model", "baseline", "model", "baseline"]
    assert data["model"]["name"] == str(saved / "a") and data["baseline"]["name"] == str(saved / "b")
    assert set(data["speedup"]) == {*bench_module.METRICS, "peak_memory"}
    assert data["dtype"] == "float32" and data["device"].startswith("cpu")


def test_cli_bench_table(capsys, saved):
    result = invoke(
        capsys, "bench", saved / "a", "--baseline", saved / "b", "--prompt-len", "16", "--batch", "1",
        "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "cpu (" in result.out and "float32" in result.out
    assert "prefill tokens/s (batch 1)" in result.out and "speedup" in result.out and "×" in result.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "batch: Input should be greater than or equal to 1"),
        (["--prompt-len", "200"], "--prompt-len 200 is longer than the context of"),
        (["--prompt-len", "100"], "--prompt-len 100 + --new-tokens 64 (164 tokens) is longer than"),
        (
            ["--sparse-kernels", "--kernel-backend", "cutlass"],  # auto on the CPU: the CPU kernels
            "2:4 sparse kernels need an NVIDIA GPU of compute capability 8.0 or newer",
        ),
        (
            ["--sparse-kernels", "--kernel-backend", "cusparselt", "--device", "cpu", "--dtype", "float16"],
            "this run is on cpu",
        ),
    ],
)
def test_cli_bench_bad_input_exits_2_before_loading(capsys, saved, no_model_loading, args, message):
    result = invoke(capsys, "bench", saved / "a", *args)
    assert message in result.error_line


def test_cli_bench_bad_baseline_path(capsys, saved, no_model_loading):
    result = invoke(capsys, "bench", saved / "a", "--baseline", saved / "missing")
    assert "model path not found" in result.error_line


def test_embedded_prompt_windows_fill_the_batch():
    tokenizer = llmprune.load_tokenizer("smollm2")
    config = bench_module.BenchConfig(prompt="embedded", prompt_len=16, batch=3)
    prompt = bench_module.make_prompt(config, len(tokenizer), tokenizer)
    expected = llmprune.evaluation_data(tokenizer, "embedded", 16, 3)
    assert torch.equal(prompt, expected)


@pytest.mark.slow
def test_bench_on_the_embedded_model():
    config = llmprune.BenchConfig(prompt="embedded", prompt_len=32, batch=2, new_tokens=2, repeats=1)
    result = llmprune.bench(config, warmup=0, device="cpu")
    assert result.model.name == "smollm2" and result.dtype == "float32"
    assert result.model.prefill_tokens_per_s > 0 and result.model.weight_bytes > 500 * 2**20
