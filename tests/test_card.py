"""Every saved model has a Hugging Face model card (``README.md``) whose front matter the Hub reads back:
after ``llmprune prune`` (in memory and streamed), compress and decompress."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import llmprune
from conftest import tiny_llama_for
from llmprune.data.text import embedded_text
from llmprune.export.card import CARD_FILE, base_model_of
from llmprune.storage import METADATA_FILE, read_metadata

SOURCE = Path(__file__).resolve().parents[1] / "src" / "llmprune"
DENSE = "someone/tiny-dense"
"""The base_model the source checkpoint's own card names."""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card")
    tokenizer = llmprune.load_tokenizer("smollm2")
    model = root / "tiny"
    tiny_llama_for(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    (model / CARD_FILE).write_text(f"---\nbase_model: {DENSE}\nlicense: apache-2.0\n---\n\n# A tiny model\n")
    text = root / "text.txt"
    text.write_text(embedded_text()[:20_000], encoding="utf-8")
    return {"model": model, "text": text, "root": root}


def run(files, output: Path, **options) -> Path:
    config = llmprune.RunConfig(
        model=str(files["model"]),
        calibration=str(files["text"]),
        nsamples=2,
        seqlen=16,
        eval_nsamples=2,
        eval_seqlen=16,
        dtype="float32",
        device="cpu",
        output=str(output),
        **options,
    )
    return llmprune.run(config).output


def card(directory: Path) -> ModelCard:
    return ModelCard.load(directory / CARD_FILE)


@pytest.fixture(scope="module")
def pruned(files) -> Path:
    return run(files, files["root"] / "pruned", method="wanda", pattern="2:4")


def test_a_pruned_model_has_a_card_the_hub_reads(pruned):
    data = card(pruned).data
    assert data.base_model == DENSE  # from the source's own card: a local path means nothing on the Hub
    assert data.library_name == "transformers"  # from_pretrained loads it as it is
    assert data.pipeline_tag == "text-generation"
    assert {"llmprune", "pruned", "sparsity", "wanda", "2:4"} <= set(data.tags)
    assert "license" not in data.to_dict()  # not the source's: nothing is claimed that was not recorded


def test_the_card_body_gives_the_perplexities_and_how_to_load(pruned):
    text = card(pruned).text
    perplexity = read_metadata(pruned)["perplexity"]
    assert f"| {perplexity['dense']:.2f} | {perplexity['pruned']:.2f} |" in text
    assert 'llmprune.load("PATH")' in text and "AutoModelForCausalLM.from_pretrained" in text
    assert '"method": "wanda"' in text  # the recipe


def test_a_compressed_model_is_carded_for_llmprune_and_decompressing_restores_transformers(pruned, tmp_path):
    packed = llmprune.compress(pruned, tmp_path / "packed")
    data = card(packed).data
    assert data.library_name == "llmprune"  # transformers cannot open the packed weights
    assert data.base_model == DENSE  # carried over from the card of what was compressed
    assert {"compressed", "wanda", "2:4"} <= set(data.tags)
    assert "llmprune decompress" in card(packed).text
    plain = llmprune.decompress(packed, tmp_path / "plain")
    assert card(plain).data.library_name == "transformers"
    assert "compressed" not in card(plain).data.tags


def test_the_compressed_save_of_a_run_and_the_streamed_save_have_cards(files, tmp_path):
    saved = run(files, tmp_path / "packed", method="magnitude", save_format="compressed")
    assert card(saved).data.library_name == "llmprune"
    streamed = run(files, tmp_path / "streamed", method="magnitude", offload=True)
    data = card(streamed).data
    assert (data.library_name, data.base_model) == ("transformers", DENSE)
    assert {"magnitude", "unstructured"} <= set(data.tags)


def test_a_card_is_written_even_without_a_recipe(tmp_path):
    from llmprune.export.save import save_pruned

    saved = save_pruned(tiny_llama_for(llmprune.load_tokenizer("smollm2")), None, tmp_path / "out", {"a": 1})
    assert (saved / METADATA_FILE).is_file()
    data = card(saved).data
    assert data.library_name == "transformers" and "base_model" not in data.to_dict()


@pytest.mark.parametrize(
    ("source", "base"),
    [
        ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # the repository its GGUF was made from
        ("gpt2", "gpt2"),
        ("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M"),
        ("./missing/model", None),
        ("/abs/model", None),
        ("model.gguf", None),
        ("not a repo id!", None),
        (None, None),
    ],
)
def test_base_model_of_a_source(source, base):
    assert base_model_of(source) == base


def test_base_model_of_a_local_directory_is_its_cards(tmp_path):
    assert base_model_of(tmp_path) is None  # no card: a local path means nothing on the Hub
    (tmp_path / CARD_FILE).write_text("---\nbase_model: org/dense\n---\n")
    assert base_model_of(tmp_path) == "org/dense"
    (tmp_path / CARD_FILE).write_text("---\n: [broken\n---\n")
    assert base_model_of(tmp_path) is None


def test_only_the_model_metadata_writer_writes_llmprune_json():
    """Every save goes through ``export.save.write_model_metadata`` (which writes the card too): no other
    module calls ``storage.write_metadata``."""
    callers = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if getattr(node, "id", getattr(node, "attr", None)) == "write_metadata":
                callers.add(path.relative_to(SOURCE).as_posix())
    assert callers <= {"storage.py", "export/save.py"}, sorted(callers)
