"""``llmprune.load(path, sparse_kernels="cpu")``: pruned and compressed checkpoints loaded straight into
``SparseLinear`` modules. The stored layouts convert to the kernels' exactly as ``cpu_kernels.from_dense``
of the decoded weight; the loaded model gives the logits and greedy tokens of the plain load; layers left
dense are listed with the reason; bad input is one line.

The compiled kernels need not be built: ``native_problem`` is stood in for, and the kernels' torch
reference computes the same results.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import llmprune
from conftest import relative_error, tiny_calibration, tiny_model
from llmprune.errors import UsageError
from llmprune.export import sparse_load
from llmprune.export.sparse_load import dense_to_bitmask, packed_to_bitmask
from llmprune.inference import cpu_kernels
from llmprune.inference.cpu_kernels import from_dense
from llmprune.inference.sparse_linear import SparseLinear
from llmprune.models.packed import SUFFIX
from llmprune.models.packing import pack, unpack
from llmprune.storage import METADATA_FILE
from llmprune.structured.checkpoint import WIDTHS_KEY

TOKENS = tiny_calibration(nsamples=2, seqlen=12, seed=3)
PREFILL = tiny_calibration(nsamples=1, seqlen=40, seed=4)  # more than SPARSE_TOKENS: the dense path


pytestmark = pytest.mark.usefixtures("kernels_available")  # conftest: the kernels count as built


def assert_same_layout(got, expected) -> None:
    assert (got.rows, got.cols) == (expected.rows, expected.cols)
    assert got.values.dtype == expected.values.dtype
    assert torch.equal(got.offsets, expected.offsets)
    assert torch.equal(got.mask, expected.mask)
    assert torch.equal(got.values, expected.values)


def sparse_matrix(rows: int, cols: int, seed: int, density: float = 0.4) -> torch.Tensor:
    """Random weights, about ``density`` kept, with an empty row and an empty column."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight[torch.rand(rows, cols, generator=generator) > density] = 0.0
    weight[1] = 0.0
    weight[:, 2] = 0.0
    return weight


def n_m_matrix(rows: int, cols: int, n: int, m: int, axis: int, seed: int) -> torch.Tensor:
    """At most ``n`` of every ``m`` along ``axis`` kept; some groups hold fewer (padded when packed)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    grouped = weight if axis == 1 else weight.t().contiguous()
    groups = grouped.reshape(-1, m)
    drop = groups.abs().argsort(dim=1)[:, : m - n]
    groups.scatter_(1, drop, 0.0)
    rows, columns = torch.rand(groups.shape[0], 1, generator=generator), torch.rand(m, generator=generator)
    fewer = (rows < 0.3) & (columns < 0.5)
    groups.masked_fill_(fewer, 0.0)  # fewer than n in some groups
    groups[0] = 0.0
    weight = groups.reshape(grouped.shape)
    return weight if axis == 1 else weight.t().contiguous()


@pytest.fixture(params=[False, True], ids=["blocks-whole", "blocks-small"])
def block(request, monkeypatch):
    """Convert in one block, or in blocks of 8 rows (the last one short)."""
    if request.param:
        monkeypatch.setattr(sparse_load, "BLOCK", 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", [(20, 128), (13, 70), (70, 13)])
def test_bitmask_converts_as_from_dense_of_the_decoded_weight(block, shape, transposed, dtype):
    weight = sparse_matrix(*shape, seed=1).to(dtype)
    packed = pack(weight, "bitmask")
    expected = from_dense((unpack(packed).t() if transposed else unpack(packed)).contiguous())
    assert_same_layout(packed_to_bitmask(packed, transposed), expected)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("layout", ["2:4", "4:8", "1:4"])
def test_n_m_converts_as_from_dense_of_the_decoded_weight(block, layout, axis, transposed):
    n, m = (int(part) for part in layout.split(":"))
    weight = n_m_matrix(24, 40, n, m, axis, seed=2)
    packed = pack(weight, layout, axis)
    assert packed.layout == layout and packed.axis == axis
    decoded = unpack(packed)
    assert torch.equal(decoded, weight)
    expected = from_dense((decoded.t() if transposed else decoded).contiguous())
    assert_same_layout(packed_to_bitmask(packed, transposed), expected)


def test_the_zeros_that_pad_n_m_groups_are_not_kept():
    weight = torch.zeros(4, 8)
    weight[0, 1] = 1.0  # one non-zero in a 2:4 group: the group is stored with a zero beside it
    weight[3, 6] = weight[3, 7] = -2.0
    packed = pack(weight, "2:4")
    assert packed.parts["values"].numel() == 2 * 8  # 8 groups, 2 values each
    layout = packed_to_bitmask(packed)
    assert layout.nnz == 3 and layout.offsets.tolist() == [0, 1, 1, 1, 3]


def test_values_are_cast_and_the_stored_dtype_must_be_one_the_kernels_take():
    weight = sparse_matrix(16, 64, seed=3).to(torch.float16)
    packed = pack(weight, "bitmask")
    assert_same_layout(packed_to_bitmask(packed, dtype=torch.float32), from_dense(weight.float()))
    assert_same_layout(dense_to_bitmask(weight, True, torch.bfloat16), from_dense(weight.t().bfloat16()))
    with pytest.raises(ValueError, match="float32 or bfloat16 values, not float16"):
        packed_to_bitmask(packed)


# --- loading models ----------------------------------------------------------------------------------------

LLAMA = LlamaConfig(  # q/k/v/gate/up: 64 inputs (mask rows reused), down: 96 (re-cut into rows)
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
CASES = [("llama", "unstructured"), ("llama", "2:4"), ("gpt2", "unstructured"), ("gpt2", "2:4")]


def pruned_model(family: str, pattern: str) -> torch.nn.Module:
    if family == "llama":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LLAMA).eval()
    else:
        model = tiny_model(family)
    sparsity = 0.6 if pattern == "unstructured" else None
    llmprune.prune(model, tiny_calibration(), method="magnitude", pattern=pattern, sparsity=sparsity)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[tuple[str, str, str], Path]:
    """Each case saved plain (the unstructured Llama in shards) and compressed."""
    root = tmp_path_factory.mktemp("sparse-load")
    saved = {}
    for family, pattern in CASES:
        name = f"{family}-{pattern.replace(':', 'of')}"
        shards = "40KB" if (family, pattern) == ("llama", "unstructured") else "50GB"
        pruned_model(family, pattern).save_pretrained(root / name, max_shard_size=shards)
        saved[family, pattern, "plain"] = root / name
        saved[family, pattern, "compressed"] = llmprune.compress(root / name, root / f"{name}-compressed")
    assert len(list(saved["llama", "unstructured", "compressed"].glob(f"*{SUFFIX}"))) > 1
    return saved



def run(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("kind", ["plain", "compressed"])
@pytest.mark.parametrize(("family", "pattern"), CASES)
def test_loaded_model_gives_the_logits_of_the_plain_load(checkpoints, family, pattern, kind):
    path = checkpoints[family, pattern, kind]
    reference = llmprune.load(path, dtype="float32", device="cpu")
    model = llmprune.load(path, dtype="float32", device="cpu", sparse_kernels="cpu")
    assert type(model) is type(reference) and not model.training
    report = model.sparse_kernels_report
    sparse = {name for name, module in model.named_modules() if isinstance(module, SparseLinear)}
    assert sparse == set(report.swapped) and len(sparse) == (2 * 7 if family == "llama" else 3 * 4)
    assert {model.get_submodule(name).values.dtype for name in sparse} == {torch.float32}
    for tokens in (TOKENS, PREFILL):
        assert relative_error(run(model, tokens), run(reference, tokens)) <= 1e-5


def test_greedy_generation_is_that_of_the_plain_load(checkpoints):
    path = checkpoints["llama", "2:4", "compressed"]
    reference = llmprune.load(path, device="cpu")
    model = llmprune.load(path, device="cpu", sparse_kernels="cpu")
    prompt = TOKENS[:1, :5]
    options = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(prompt, **options), reference.generate(prompt, **options))


def test_layers_left_dense_are_listed_with_the_reason(checkpoints):
    llama = llmprune.load(checkpoints["llama", "2:4", "plain"], sparse_kernels="cpu")
    [head] = llama.sparse_kernels_report.skipped
    assert head.name == "lm_head" and head.reasons == ("sparsity 0% is below the kernels' break-even of 30%",)
    assert type(llama.lm_head) is torch.nn.Linear
    gpt2 = llmprune.load(checkpoints["gpt2", "2:4", "compressed"], sparse_kernels="cpu")
    [head] = gpt2.sparse_kernels_report.skipped
    assert head.name == "lm_head" and head.reasons == ("weight shared with transformer.wte",)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight


def test_a_layer_below_the_break_even_stays_dense(tmp_path):
    model = pruned_model("llama", "unstructured")
    dense = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        dense.weight.copy_(torch.randn_like(dense.weight))
        dense.weight[:, :16] = 0.0  # 25 % sparse: 16 of 64 inputs
    model.save_pretrained(tmp_path / "mixed")
    loaded = llmprune.load(llmprune.compress(tmp_path / "mixed", tmp_path / "packed"), sparse_kernels="cpu")
    skipped = {choice.name: choice.reasons for choice in loaded.sparse_kernels_report.skipped}
    assert skipped["model.layers.1.mlp.up_proj"] == ("sparsity 25% is below the kernels' break-even of 30%",)
    [choice] = [c for c in loaded.sparse_kernels_report.skipped if c.name == "model.layers.1.mlp.up_proj"]
    assert choice.sparsity == 0.25 and choice.shape == (96, 64)
    assert type(loaded.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, dense.weight)
    assert relative_error(run(loaded, TOKENS), run(model, TOKENS)) <= 1e-5


def test_bfloat16_and_float16_checkpoints(checkpoints, tmp_path):
    path = checkpoints["llama", "unstructured", "compressed"]
    model = llmprune.load(path, dtype="bfloat16", sparse_kernels="cpu")
    reference = llmprune.load(path, dtype="bfloat16", device="cpu")
    assert model.model.layers[0].self_attn.q_proj.values.dtype == torch.bfloat16
    assert relative_error(run(model, TOKENS), run(reference, TOKENS)) <= 2e-2  # bf16 activations differ
    half = llmprune.load(checkpoints["llama", "2:4", "plain"], dtype="float16", device="cpu")
    half.save_pretrained(tmp_path / "half")
    model = llmprune.load(tmp_path / "half", sparse_kernels="cpu")  # auto: float32
    reference = llmprune.load(tmp_path / "half", dtype="float32", device="cpu")
    assert model.model.layers[0].mlp.up_proj.values.dtype == torch.float32
    assert relative_error(run(model, TOKENS), run(reference, TOKENS)) <= 1e-5


# --- bad input ---------------------------------------------------------------------------------------------


def no_weight_reads(monkeypatch) -> None:
    from llmprune.models.packed import CompressedCheckpoint
    from llmprune.models.shards import CheckpointShards

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(CheckpointShards, "read", refuse)
    monkeypatch.setattr(CompressedCheckpoint, "read_packed", refuse)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sparse_kernels": "gpu"}, "sparse_kernels must be None or 'cpu', got 'gpu'"),
        ({"sparse_kernels": True}, "sparse_kernels must be None or 'cpu', got True"),
        ({"sparse_kernels": "cpu", "device": "cuda"}, "pass device='cpu' or 'auto', not 'cuda'"),
        ({"sparse_kernels": "cpu", "dtype": "float16"}, "take float32 or bfloat16 weights, not float16"),
    ],
)
def test_bad_options_are_refused_before_any_weight_is_read(checkpoints, monkeypatch, options, message):
    no_weight_reads(monkeypatch)
    with pytest.raises(UsageError, match=re.escape(message)):
        llmprune.load(checkpoints["llama", "2:4", "plain"], **options)


def test_missing_compiled_kernels_are_refused_before_any_weight_is_read(checkpoints, monkeypatch):
    no_weight_reads(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "native_problem", lambda: "the kernels are missing: reinstall")
    with pytest.raises(UsageError, match=r"^the kernels are missing: reinstall$"):
        llmprune.load(checkpoints["llama", "2:4", "compressed"], sparse_kernels="cpu")


def test_a_model_with_no_sparse_layer_names_the_layers_and_their_sparsity(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path / "dense")
    with pytest.raises(UsageError) as error:
        llmprune.load(tmp_path / "dense", sparse_kernels="cpu")
    message = str(error.value)
    assert "\n" not in message and "can use the CPU sparse kernels (" in message
    assert "transformer.h.0.attn.c_attn (sparsity 0% is below the kernels' break-even of 30%)" in message


def copy_without(source: Path, destination: Path, tensor: str) -> Path:
    shutil.copytree(source, destination)
    weights = load_file(destination / "model.safetensors")
    del weights[tensor]
    save_file(weights, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight"])
def test_a_missing_tensor_is_named(checkpoints, tmp_path, tensor):
    damaged = copy_without(checkpoints["llama", "2:4", "plain"], tmp_path / "partial", tensor)
    with pytest.raises(UsageError, match=f"checkpoint has no tensor {tensor}$"):
        llmprune.load(damaged, sparse_kernels="cpu")


def test_a_corrupted_compressed_checkpoint_is_one_line(checkpoints, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoints["gpt2", "2:4", "compressed"], damaged)
    path = damaged / f"model{SUFFIX}"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the last tensor's data: its checksum catches it
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"is corrupted: tensor .* does not match its checksum$"):
        llmprune.load(damaged, sparse_kernels="cpu")


def test_an_adaptive_width_checkpoint_is_refused(checkpoints, tmp_path, monkeypatch):
    adaptive = tmp_path / "adaptive"
    shutil.copytree(checkpoints["llama", "2:4", "plain"], adaptive)
    (adaptive / METADATA_FILE).write_text(json.dumps({WIDTHS_KEY: [[4, 96], [4, 96]]}))
    no_weight_reads(monkeypatch)
    with pytest.raises(UsageError, match="per-layer widths"):
        llmprune.load(adaptive, sparse_kernels="cpu")
