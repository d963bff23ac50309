"""``llmprune finetune``: sparse fine-tuning (keeping the mask) or gradual pruning while training."""

from __future__ import annotations

import json
from typing import Any

import click

from llmprune.config import build, read_recipe
from llmprune.training.config import FinetuneConfig

from .console import Interrupted, console, out
from .options import config_options, given
from .render import counted_progress


@click.command()
@click.argument("model", required=False)
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML file of options (flags override it)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@config_options(FinetuneConfig, skip=("model",))
def finetune(model: str | None, recipe: str | None, quiet: bool, as_json: bool, **flags: Any) -> None:
    """Fine-tune a pruned MODEL keeping its zeros exactly (LM loss, optionally distilled from the dense
    model), or prune MODEL gradually while training (--gradual); save Hugging Face checkpoints."""
    from llmprune.training.finetuning import finetune as run_finetune

    values = read_recipe(recipe, FinetuneConfig) if recipe else {}
    values.update(given(flags))
    if model:
        values["model"] = model
    config = build(FinetuneConfig, values)
    done = 0  # steps finished (their checkpoint saved, if they have one)

    try:
        with counted_progress(console, "training steps", quiet or as_json) as advance:

            def progress(step: int, loss: float, _model) -> None:
                nonlocal done
                done = step
                advance(step, config.steps)
                if not (quiet or as_json) and (step == 1 or step % 10 == 0 or step == config.steps):
                    console.print(f"step {step}/{config.steps}: loss {loss:.4f}", soft_wrap=True)

            result = run_finetune(config, on_step=progress)
    except KeyboardInterrupt:
        kept = [str(config.checkpoint_path(step)) for step in config.checkpoint_steps() if step <= done]
        raise Interrupted(
            f"{config.output_path()} was not written; kept the step checkpoint(s) {', '.join(kept)}"
            if kept
            else "no output was written"
        ) from None
    if as_json:
        record = {"output": str(result.output), "losses": result.losses, **result.metadata}
        click.echo(json.dumps(record, indent=2, default=str))
        return
    ppl = result.metadata["perplexity"]
    if ppl["before"] is not None:
        out.print(f"perplexity (embedded): {ppl['before']:.2f} → {ppl['after']:.2f}", soft_wrap=True)
    out.print(
        f"sparsity {result.overall_sparsity:.2%} ({result.pattern}); "
        f"{result.seconds_per_step:.2f} s per step; "
        f"loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}",
        soft_wrap=True,
    )
    out.print(f"saved to {result.output}", soft_wrap=True)
