"""Hostile model inputs (issue 14, items 3, 6 and 12): pickle checkpoints, broken checkpoint directories,
damaged GGUF files and cached conversions, a cache that is a file, and messages that blame the network only
for a hub id. Every refusal is one line, exit 2, before any model is loaded; each command goes through
the one validation (``models/loading.py`` ``check_model_name``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

import llmprune
from conftest import invoke, save_tiny_llama
from llmprune.errors import UsageError
from llmprune.models import loading
from llmprune.models.loading import check_checkpoint_dir, check_model_name, resolve_checkpoint

COMMANDS = {  # each command, as little work as it takes; every refusal below comes before any of it
    "prune": lambda model, out: ["prune", "--model", model, "--nsamples", "2", "--seqlen", "16",
                                 "--eval-nsamples", "0", "--output", out, "-q"],
    "eval": lambda model, out: ["eval", model, "--nsamples", "1", "--seqlen", "16", "-q"],
    "inspect": lambda model, out: ["inspect", model, "--json"],
    "compress": lambda model, out: ["compress", model, "--output", out, "--quiet"],
    "finetune": lambda model, out: ["finetune", model, "--steps", "1", "--seqlen", "16", "--output", out,
                                    "-q"],
    "bench": lambda model, out: ["bench", model, "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1",
                                 "--warmup", "0", "--prompt", "embedded"],
}  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer) -> Path:
    """A whole 2-layer Llama checkpoint with the embedded tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("hostile") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory) -> Path:
    return llmprune.compress(tiny, tmp_path_factory.mktemp("hostile-compressed") / "tiny")


def refuse_pickle(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle file was loaded")

    monkeypatch.setattr(torch, "load", refuse)


def pickle_only(tiny: Path, directory: Path, weights: str = "pytorch_model.bin") -> Path:
    """The tiny checkpoint with its weights ``torch.save``d (pickle) instead of in safetensors."""
    shutil.copytree(tiny, directory)
    (directory / "model.safetensors").unlink()
    torch.save(load_file(tiny / "model.safetensors"), directory / weights)
    return directory


@pytest.mark.parametrize("command", COMMANDS)
def test_pickle_weights_are_refused_by_every_command(
    command, capsys, tiny, tmp_path, monkeypatch, no_model_loading
):
    model = pickle_only(tiny, tmp_path / "bin")
    refuse_pickle(monkeypatch)
    line = invoke(capsys, *COMMANDS[command](model, tmp_path / "out")).error_line
    assert f"{model} holds only pickle weights (pytorch_model.bin), which llmprune does not load" in line
    assert "save_pretrained(path, safe_serialization=True)" in line  # how to convert them
    assert "--offload" not in line and "offline" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "weights", ["pytorch_model-00001-of-00002.bin", "model.pt", "consolidated.pth", "last.ckpt"]
)
def test_every_pickle_weight_file_is_refused(weights, tiny, tmp_path, monkeypatch):
    model = pickle_only(tiny, tmp_path / "bin", weights)
    refuse_pickle(monkeypatch)
    with pytest.raises(UsageError, match=f"holds only pickle weights \\({weights}\\)"):
        check_model_name(str(model))


def test_a_hub_repo_with_pickle_weights_only_is_refused(capsys, tiny, tmp_path, monkeypatch):
    """Through transformers' own lookup (``use_safetensors=True``), in a hub cache holding only .bin."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--nobody--pickled"
    pickle_only(tiny, repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    refuse_pickle(monkeypatch)
    line = invoke(capsys, *COMMANDS["prune"]("nobody/pickled", tmp_path / "out")).error_line
    assert "'nobody/pickled' on the hub has no safetensors weights" in line
    assert "save_pretrained(path, safe_serialization=True)" in line and "offline" not in line


def test_every_model_load_asks_for_safetensors_only(tiny, compressed, monkeypatch):
    """Also a hub id, which the directory checks cannot see: transformers then refuses .bin-only repos."""
    asked = []

    class Stop(Exception):
        pass

    def capture(cls, *args, **kwargs):
        asked.append(kwargs.get("use_safetensors"))
        raise Stop

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(capture))
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(capture))
    for load in (
        lambda: llmprune.load("nobody/some-model"),
        lambda: llmprune.load(str(tiny)),
        lambda: llmprune.load(tiny),
        lambda: llmprune.load(compressed),
    ):
        with pytest.raises(Stop):
            load()
    assert asked == [True] * 4


def _config_only(path: Path) -> None:
    for file in path.iterdir():
        if file.name != "config.json":
            file.unlink()


def _no_tokenizer(path: Path) -> None:
    for name in TOKENIZER_FILES:
        (path / name).unlink()


def _truncated_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


def _edit_config(**values):
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **values}))

    return edit


def _write(name: str, content: bytes):
    def write(path: Path) -> None:
        (path / name).write_bytes(content)

    return write


def _missing_shard(path: Path) -> None:
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    weight_map = {"lm_head.weight": "model-00002-of-00002.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


ALL = set(COMMANDS)
ANY_ARCHITECTURE = ALL - {"inspect"}  # inspect reads the tensors of architectures transformers does not know
NEED_TOKENIZER = ALL - {"inspect", "compress"}
BROKEN = {  # what is done to a copy of the tiny checkpoint, what the line says, the commands it concerns
    "config alone": (_config_only, "has no safetensors weights (model.safetensors", ALL),
    "no tokenizer": (_no_tokenizer, "has no tokenizer (none of tokenizer.json", NEED_TOKENIZER),
    "truncated weights": (_truncated_weights, "model.safetensors is truncated or damaged", ALL),
    "weights not safetensors": (
        _write("model.safetensors", b"<html>rate limited</html>"),
        "model.safetensors is truncated or not a safetensors file",
        ALL,
    ),
    "unknown model_type": (
        _edit_config(model_type="frobnicator"),
        "config.json: model_type 'frobnicator' is unknown to transformers",
        ANY_ARCHITECTURE,
    ),
    "no model_type": (_edit_config(model_type=None), "config.json has no model_type", ANY_ARCHITECTURE),
    "not a causal LM": (
        _edit_config(model_type="vit"), "model_type 'vit' is not a causal language model", ANY_ARCHITECTURE
    ),
    "config a list": (_write("config.json", b"[]"), "config.json holds a JSON list, not an object", ALL),
    "config not JSON": (_write("config.json", b'{"model_type": '), "config.json is not valid JSON", ALL),
    "missing shard": (
        _missing_shard,
        "shard files listed in model.safetensors.index.json are missing: model-00002-of-00002.safetensors",
        ALL,
    ),
}
CASES = [(case, command) for case, (_, _, commands) in BROKEN.items() for command in sorted(commands)]


@pytest.mark.parametrize(("case", "command"), CASES)
def test_broken_checkpoint_is_one_line_before_loading(
    case, command, capsys, tiny, tmp_path, no_model_loading
):
    damage, message, _ = BROKEN[case]
    model = Path(shutil.copytree(tiny, tmp_path / "broken"))
    damage(model)
    line = invoke(capsys, *COMMANDS[command](model, tmp_path / "out")).error_line
    assert str(model) in line and message in line
    assert "offline" not in line and "Traceback" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_compressed_weights_without_their_manifest(command, capsys, compressed, tmp_path, no_model_loading):
    model = Path(shutil.copytree(compressed, tmp_path / "copy"))
    (model / "llmprune.json").unlink()
    line = invoke(capsys, *COMMANDS[command](model, tmp_path / "out")).error_line
    assert f"{model} holds compressed weights but no llmprune.json manifest" in line
    assert "offline" not in line


def test_weights_without_tokenizer_serve_commands_that_need_none(capsys, tiny, tmp_path):
    model = Path(shutil.copytree(tiny, tmp_path / "weights-only"))
    _no_tokenizer(model)
    assert invoke(capsys, "inspect", model, "--json").code == 0
    bench = COMMANDS["bench"](model, None)[:-2]  # the random prompt needs no tokenizer
    assert invoke(capsys, *bench, "--batch", "1", "--json").code == 0
    assert invoke(capsys, "compress", model, "--output", tmp_path / "out", "--quiet").code == 0


@pytest.mark.parametrize("command", ["prune", "eval", "finetune", "bench"])
def test_a_file_that_is_not_gguf(command, capsys, tmp_path, no_model_loading):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"<html>not found</html>" * 10)
    line = invoke(capsys, *COMMANDS[command](gguf, tmp_path / "out")).error_line
    assert f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes)" in line


def test_a_damaged_gguf_fails_in_one_line(capsys, tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    line = invoke(capsys, *COMMANDS["eval"](gguf, None)).error_line
    assert f"{gguf} cannot be read as a GGUF model" in line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("under", ["", "sub"])
def test_cache_that_is_a_file_is_refused_before_converting(under, capsys, tmp_path, monkeypatch):
    cache = tmp_path / "afile"
    cache.write_text("mine")
    monkeypatch.setenv("LLMPRUNE_CACHE", str(cache / under))

    def refuse(*args):
        raise AssertionError("converted")

    monkeypatch.setattr(loading, "convert_gguf", refuse)
    line = invoke(capsys, *COMMANDS["prune"]("smollm2", tmp_path / "out")).error_line
    assert f"{cache} is a file, not a directory (set LLMPRUNE_CACHE to a writable directory)" in line
    assert cache.read_text() == "mine"


def test_damaged_cached_conversion_is_converted_again(tiny, tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    conversions = []

    def convert(source: Path, destination: Path) -> Path:  # what convert_gguf writes, without a real GGUF
        conversions.append(source)
        shutil.copytree(tiny, destination)
        return destination

    monkeypatch.setattr(loading, "convert_gguf", convert)
    cached = Path(resolve_checkpoint(str(gguf)))
    assert resolve_checkpoint(str(gguf)) == str(cached) and len(conversions) == 1  # whole: used as it is
    _truncated_weights(cached)
    check_model_name(str(gguf))  # not an error: it will be converted again
    assert resolve_checkpoint(str(gguf)) == str(cached) and len(conversions) == 2
    check_checkpoint_dir(cached)
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # the damaged copy is gone


def test_offline_is_suggested_only_for_a_hub_id(capsys, tiny, monkeypatch):
    line = invoke(capsys, *COMMANDS["eval"]("nobody/no-such-model", None)).error_line
    assert "cannot load 'nobody/no-such-model'" in line and "(offline? download it first)" in line

    def unreadable(*args, **kwargs):
        raise OSError("[Errno 13] Permission denied: 'config.json'")

    monkeypatch.setattr(AutoConfig, "from_pretrained", unreadable)
    with pytest.raises(UsageError, match="Permission denied") as caught:
        loading.load_skeleton(str(tiny))
    assert "offline" not in str(caught.value)


def test_bench_reads_a_compressed_checkpoint(capsys, compressed):
    result = invoke(capsys, *COMMANDS["bench"](compressed, None), "--batch", "1", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["model"]["name"] == str(compressed)
