"""Compact sparse checkpoints: bit-exact round trips, the size bound, loading, and damaged files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmprune
from conftest import invoke, prune_args, save_text, save_tiny_llama, tiny_calibration, tiny_model
from llmprune.errors import UsageError
from llmprune.methods.patterns import n_m_mask
from llmprune.models.packed import MANIFEST_KEY, SUFFIX, CompressedCheckpoint
from llmprune.models.packing import choose_layout, nonzero_bits, pack, pack_uints, unpack, unpack_uints
from llmprune.storage import METADATA_FILE

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PATTERNS = {"unstructured": ("unstructured", 0.5), "2:4": ("2:4", None), "4:8": ("4:8", None)}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, for bit-exact comparisons (-0.0 differs from 0.0, NaN equals itself)."""
    return tensor.contiguous().view(BITS[tensor.element_size()])


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """A tiny Llama pruned by Wanda in each pattern (in float32, then cast), saved in each dtype."""
    root = tmp_path_factory.mktemp("pruned")
    saved = {}
    for key, (pattern, sparsity) in PATTERNS.items():
        model = tiny_model("llama")
        llmprune.prune(model, tiny_calibration(), method="wanda", pattern=pattern, sparsity=sparsity)
        for dtype_name, dtype in DTYPES.items():
            directory = root / f"{key.replace(':', 'of')}-{dtype_name}"
            model.to(dtype).save_pretrained(directory)
            saved[key, dtype_name] = directory
    return saved


@pytest.fixture(scope="module")
def compressed(pruned, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("compressed")
    return {key: llmprune.compress(path, root / path.name) for key, path in pruned.items()}


def decoder_linear(name: str) -> bool:
    return ".layers." in name and name.endswith("_proj.weight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_round_trip_is_bit_exact(pruned, compressed, pattern, dtype):
    dense = load_file(pruned[pattern, dtype] / "model.safetensors")
    checkpoint = CompressedCheckpoint(compressed[pattern, dtype])
    assert_bit_equal(checkpoint.state_dict(), dense)
    layouts = {name: entry["layout"] for name, entry in checkpoint.entries.items()}
    expected = "bitmask" if pattern == "unstructured" else pattern
    assert {layouts[name] for name in dense if decoder_linear(name)} == {expected}
    assert {layouts[name] for name in dense if not decoder_linear(name)} == {"dense"}  # norms, embeddings


def stored_bytes(directory: Path, names: list[str]) -> int:
    """Bytes of the parts stored for ``names``, read from the compressed file itself."""
    total = 0
    with safe_open(str(directory / f"model{SUFFIX}"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            if key.split("@")[0] in names:
                part = handle.get_slice(key)
                total += (
                    math.prod(part.get_shape()) * {"F16": 2, "BF16": 2, "F32": 4, "U8": 1}[part.get_dtype()]
                )
    return total


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_linear_weights_take_at_most_057_of_their_fp16_bytes(pruned, compressed, pattern):
    dense = load_file(pruned[pattern, "float16"] / "model.safetensors")
    linear = [name for name in dense if decoder_linear(name)]
    dense_bytes = sum(dense[name].numel() * 2 for name in linear)
    ratio = stored_bytes(compressed[pattern, "float16"], linear) / dense_bytes
    assert ratio <= 0.57
    assert ratio == pytest.approx(0.5625, abs=1e-3)  # values 1/2 + 1 bit (or 2 x 2 bits per 4) a weight
    manifest = json.loads((compressed[pattern, "float16"] / METADATA_FILE).read_text())[MANIFEST_KEY]
    layout = manifest["layouts"]["bitmask" if pattern == "unstructured" else pattern]
    assert layout["stored_bytes"] / layout["dense_bytes"] == pytest.approx(ratio)
    whole = (compressed[pattern, "float16"] / f"model{SUFFIX}").stat().st_size
    assert whole < (pruned[pattern, "float16"] / "model.safetensors").stat().st_size


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_load_gives_identical_logits(pruned, compressed, pattern):
    tokens = tiny_calibration(2, 16, seed=1)
    reference = llmprune.load(pruned[pattern, "bfloat16"], dtype="bfloat16", device="cpu")
    loaded = llmprune.load(compressed[pattern, "bfloat16"], dtype="bfloat16", device="cpu")
    assert type(loaded) is type(reference) and not loaded.training
    assert_bit_equal(loaded.state_dict(), reference.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, reference(tokens).logits)


def test_decompress_loads_with_plain_transformers(pruned, compressed, tmp_path):
    output = llmprune.decompress(compressed["2:4", "float16"], tmp_path / "plain")
    assert not list(output.glob(f"*{SUFFIX}")) and not (output / METADATA_FILE).exists()
    assert_bit_equal(
        load_file(output / "model.safetensors"), load_file(pruned["2:4", "float16"] / "model.safetensors")
    )
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float16)
    reference = AutoModelForCausalLM.from_pretrained(pruned["2:4", "float16"], dtype=torch.float16)
    assert_bit_equal(model.state_dict(), reference.state_dict())


def test_gpt2_conv1d_weights_pack_along_their_input_dimension(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]: N:M groups run down the columns (axis 0)."""
    model = tiny_model("gpt2")
    llmprune.prune(model, tiny_calibration(), method="magnitude", pattern="2:4")
    model.save_pretrained(tmp_path / "dense")
    checkpoint = CompressedCheckpoint(llmprune.compress(tmp_path / "dense", tmp_path / "packed"))
    c_fc = checkpoint.entries["transformer.h.0.mlp.c_fc.weight"]
    assert (c_fc["layout"], c_fc["axis"]) == ("2:4", 0)
    assert_bit_equal(checkpoint.state_dict(), load_file(tmp_path / "dense" / "model.safetensors"))


# --- the packing functions ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_signed_zeros_and_nan_survive(dtype):
    """Only +0.0 counts as zero: -0.0 and NaN are stored as values and come back bit for bit."""
    torch.manual_seed(0)
    weight = torch.randn(16, 32).to(dtype)
    weight[n_m_mask(weight.float().abs(), 2, 4)] = 0.0
    weight[0, :4] = torch.tensor([-0.0, 0.0, float("nan"), 1.0]).to(dtype)
    packed = pack(weight)
    assert packed.layout == "bitmask"  # the first group now has three "non-zeros": not 2:4 any more
    assert torch.equal(bits(unpack(packed)), bits(weight))


@pytest.mark.parametrize(("n", "m"), [(1, 2), (1, 4), (2, 4), (2, 8), (4, 8), (8, 16), (3, 8)])
def test_nm_layouts_round_trip(n, m):
    torch.manual_seed(n * m)
    weight = torch.randn(12, 48, dtype=torch.float16)
    weight[n_m_mask(weight.float().abs(), n, m)] = 0.0
    weight[1, :m] = 0.0  # a group with fewer than N non-zeros is padded with zeros
    assert choose_layout(weight) == (f"{n}:{m}", 1)
    packed = pack(weight)
    assert torch.equal(bits(unpack(packed)), bits(weight))
    assert torch.equal(bits(unpack(pack(weight, f"{n}:{m}", 1))), bits(weight))


def test_layout_choice():
    torch.manual_seed(0)
    dense = torch.randn(8, 64)
    assert choose_layout(dense)[0] == "dense"
    few_zeros = dense.clone()
    few_zeros[:, :1] = 0.0  # 1/64 zeros: a bitmask (1/32 of fp32 bytes) would cost more than it saves
    assert choose_layout(few_zeros)[0] == "dense"
    sparse = dense.clone()
    sparse[:, 1:40] = 0.0  # most groups of 4 are empty, but one group holds 3 non-zeros of 4
    assert choose_layout(sparse)[0] == "bitmask"
    assert choose_layout(torch.zeros(4, 8))[0] == "bitmask"
    assert choose_layout(torch.ones(10))[0] == "dense"  # vectors stay as they are
    assert choose_layout(torch.ones(4, 4, dtype=torch.int64))[0] == "dense"
    with pytest.raises(ValueError, match="not 2:4"):
        pack(dense, "2:4", 1)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pack_uints(width):
    values = torch.randint(0, 2**width, (37,))
    packed = pack_uints(values, width)
    assert packed.numel() == math.ceil(37 * width / 8)
    assert torch.equal(unpack_uints(packed, 37, width), values)


def test_nonzero_bits_counts_negative_zero():
    assert nonzero_bits(torch.tensor([0.0, -0.0, 1.0])).tolist() == [False, True, True]


# --- damaged files -----------------------------------------------------------------------------------


def damaged_copy(source: Path, destination: Path, damage) -> Path:
    import shutil

    shutil.copytree(source, destination)
    path = destination / f"model{SUFFIX}"
    data = bytearray(path.read_bytes())
    path.write_bytes(damage(data))
    return destination


def flip_last_tensor_byte(data: bytearray) -> bytes:
    data[-3] ^= 0x01  # in the data of the last tensor in the file: the checksum catches it
    return bytes(data)


def test_corrupted_byte_is_detected_before_any_model(compressed, tmp_path, no_model_loading):
    damaged = damaged_copy(compressed["2:4", "float16"], tmp_path / "damaged", flip_last_tensor_byte)
    with pytest.raises(UsageError, match=r"is corrupted: tensor .* does not match its checksum"):
        llmprune.load(damaged, dtype="float16", device="cpu")


def test_truncated_file_is_detected(compressed, tmp_path, no_model_loading):
    damaged = damaged_copy(compressed["unstructured", "float32"], tmp_path / "cut", lambda d: bytes(d[:-100]))
    with pytest.raises(UsageError, match=r"is truncated or damaged: \d+ bytes, \d+ were written"):
        llmprune.load(damaged)


def test_damaged_header_is_detected(compressed, tmp_path, no_model_loading):
    def scramble_header(data: bytearray) -> bytes:
        data[10:14] = b"\xff\xfe\xfd\xfc"
        return bytes(data)

    damaged = damaged_copy(compressed["2:4", "float32"], tmp_path / "header", scramble_header)
    with pytest.raises(UsageError, match="is corrupted: cannot read its header"):
        llmprune.load(damaged)


def test_decompress_of_damaged_checkpoint_writes_nothing(capsys, compressed, tmp_path):
    damaged = damaged_copy(compressed["2:4", "float16"], tmp_path / "damaged", flip_last_tensor_byte)
    line = invoke(capsys, "decompress", damaged, "--output", tmp_path / "out").error_line
    assert "does not match its checksum" in line
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]


# --- the command line --------------------------------------------------------------------------------


def test_cli_compress_and_decompress(capsys, pruned, tmp_path):
    source = pruned["4:8", "float32"]
    result = invoke(capsys, "compress", source, "--output", tmp_path / "small")
    assert result.code == 0, result.err
    assert "4:8: 21 tensors" in result.out and f"saved to {tmp_path / 'small'}" in result.out
    result = invoke(capsys, "decompress", tmp_path / "small", "--output", tmp_path / "plain")
    assert result.code == 0, result.err
    assert_bit_equal(
        load_file(tmp_path / "plain" / "model.safetensors"), load_file(source / "model.safetensors")
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "nothere", "--output", "x"], "checkpoint directory not found: nothere"),
        (["compress", "{dense}"], "output: Field required"),
        (["compress", "{dense}", "--output", "{dense}"], "exists; pass --overwrite"),
        (["compress", "{packed}", "--output", "y"], "is compressed already"),
        (["decompress", "{dense}", "--output", "y"], "is not a compressed llmprune checkpoint"),
        (["decompress", "nothere", "--output", "y"], "nothere is not a compressed llmprune checkpoint"),
    ],
)
def test_cli_bad_input(capsys, pruned, compressed, args, message):
    paths = {"dense": pruned["2:4", "float32"], "packed": compressed["2:4", "float32"]}
    line = invoke(capsys, *(a.format(**paths) for a in args)).error_line
    assert message in line


@pytest.mark.parametrize("offload", [False, True], ids=["in-memory", "streamed"])
def test_prune_save_format_compressed(capsys, cli_files, tmp_path, offload):
    output = tmp_path / "out"
    flags = ["--pattern", "2:4", "--save-format", "compressed", "--output", output, "--eval-nsamples", "0"]
    result = invoke(capsys, *prune_args(cli_files, *flags, *(["--offload"] if offload else [])))
    assert result.code == 0, result.err
    assert not list(output.glob("model*.safetensors.index.json"))
    assert all(p.name.endswith(SUFFIX) for p in output.glob("*.safetensors"))
    metadata = json.loads((output / METADATA_FILE).read_text())
    assert metadata["compressed"]["layouts"]["2:4"]["tensors"] == 14  # 2 layers x 7 projections
    model = llmprune.load(output, dtype="float32", device="cpu")
    inspected = {t["name"]: t for t in llmprune.inspect_checkpoint(output)["tensors"]}
    for row in metadata["report"]["layers"]:
        weight = model.get_submodule(row["name"]).weight
        assert (weight == 0).float().mean().item() == pytest.approx(row["achieved_sparsity"])
        assert int((weight.view(-1, 4) != 0).sum(dim=1).max()) <= 2
        tensor = inspected[f"{row['name']}.weight"]
        assert tensor["sparsity"] == pytest.approx(row["achieved_sparsity"], abs=1e-12)
        assert (tensor["layout"], tensor["patterns"][0]) == ("2:4", "2:4")


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("cli")
    return {"model": save_tiny_llama(root / "tiny-llama", tokenizer), "text": save_text(root / "text.txt")}
