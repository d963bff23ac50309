"""The sequential driver on a tiny Llama: data flow between layers, determinism, per-layer sparsity,
layer selection, input validation and non-finite values; plus atomic saving."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import llmprune
from conftest import TINY_CONFIGS, tiny_calibration, tiny_model
from llmprune import storage as save_module
from llmprune.errors import NonFiniteError, UsageError
from llmprune.export.save import save_pruned
from llmprune.storage import METADATA_FILE

NUM_LAYERS = 3


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder layers' linear layers of a Llama, by full name."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith("model.layers.") and isinstance(module, nn.Linear)
    }


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed"


def sparsity(module: nn.Module) -> float:
    return float((module.weight == 0).float().mean())


def layer_sparsity(model: nn.Module, index: int) -> float:
    """Zeros over weights across the linear layers of decoder layer ``index``."""
    mods = [m for name, m in linears(model).items() if name.startswith(f"model.layers.{index}.")]
    return sum(int((m.weight == 0).sum()) for m in mods) / sum(m.weight.numel() for m in mods)


def record_layer_inputs(model: nn.Module) -> tuple[list[list[torch.Tensor]], list]:
    """Forward pre-hooks on every decoder layer that keep the hidden states of each call."""
    received: list[list[torch.Tensor]] = [[] for _ in model.model.layers]

    def recorder(index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            received[index].append(hidden.detach().clone())

        return hook

    handles = [
        layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    return received, handles


# --- data flow -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options", "batch_sizes"),
    [
        ("wanda", {"batch_size": 3}, [3, 3, 2]),
        ("sparsegpt", {"batch_size": 8}, [8]),
        ("sparsegpt", {"true_sequential": True, "batch_size": 3}, [3, 3, 2]),  # batches in lockstep
    ],
)
def test_each_layer_is_fed_the_outputs_of_the_pruned_layers_before_it(method, options, batch_sizes):
    model = tiny_model("llama")
    calibration = tiny_calibration()
    with torch.no_grad():
        dense_hidden = model(calibration, output_hidden_states=True).hidden_states

    received, handles = record_layer_inputs(model)
    try:
        llmprune.prune(model, calibration, method=method, **options)
    finally:
        for handle in handles:
            handle.remove()

    with torch.no_grad():
        pruned_hidden = model(calibration, output_hidden_states=True).hidden_states
    for i in range(NUM_LAYERS):
        # The last call of the layer for each batch is the one whose outputs go on to layer i+1.
        last = received[i][-len(batch_sizes) :]
        assert [len(h) for h in last] == batch_sizes
        fed = torch.cat(last)
        assert torch.allclose(fed, pruned_hidden[i], rtol=1e-5, atol=1e-6), f"layer {i} got other inputs"
        if i >= 1:
            assert not torch.allclose(fed, dense_hidden[i], rtol=1e-3, atol=1e-4), (
                f"layer {i} fed dense states"
            )


def test_same_inputs_same_masks():
    for method in ("wanda", "sparsegpt"):
        first, second = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
        llmprune.prune(first, tiny_calibration(), method=method)
        llmprune.prune(second, tiny_calibration(), method=method)
        other = dict(second.named_parameters())
        for name, param in first.named_parameters():
            assert torch.equal(param, other[name]), f"{method}: {name} differs between two identical runs"


def test_iterable_of_rows_equals_the_tensor():
    as_tensor, as_rows = tiny_model("llama"), tiny_model("llama")
    llmprune.prune(as_tensor, tiny_calibration(), method="sparsegpt", batch_size=4)
    llmprune.prune(as_rows, iter(list(tiny_calibration())), method="sparsegpt", batch_size=4)
    other = weights(as_rows)
    for name, param in as_tensor.named_parameters():
        assert torch.equal(param, other[name]), name


# --- which layers, how sparse ----------------------------------------------------------------------------


def test_depth_schedule_rises_linearly_around_the_mean():
    model = tiny_model("llama")
    report = llmprune.prune(
        model, tiny_calibration(), method="wanda", sparsity=0.5, schedule="depth", schedule_spread=0.2
    )
    achieved = [layer_sparsity(model, i) for i in range(NUM_LAYERS)]
    # Per-row rounding (19.2 of 64 -> 19) makes each layer up to 1/128 off the exact 0.3, 0.5, 0.7.
    assert achieved == pytest.approx([0.3, 0.5, 0.7], abs=0.01)
    assert achieved[1] - achieved[0] == pytest.approx(achieved[2] - achieved[1], abs=0.01)
    assert sum(achieved) / NUM_LAYERS == pytest.approx(0.5, abs=0.005)
    for r in report.layers:
        assert r.target_sparsity == pytest.approx([0.3, 0.5, 0.7][r.layer])
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.005)


def test_per_layer_override_applies_to_matching_layers_only():
    model = tiny_model("llama")
    report = llmprune.prune(
        model, tiny_calibration(), method="wanda", layer_sparsity={r"mlp\.down_proj": 0.3}
    )
    for name, module in linears(model).items():
        expected = 0.3 if name.endswith("mlp.down_proj") else 0.5
        # down_proj rows have 128 inputs: round(38.4) = 38 zeros.
        assert sparsity(module) == pytest.approx(expected, abs=0.005), name
    targets = {r.name: r.target_sparsity for r in report.layers}
    assert targets["model.layers.2.mlp.down_proj"] == 0.3
    assert targets["model.layers.2.mlp.up_proj"] == 0.5


@pytest.mark.parametrize(
    ("selection", "pruned"),
    [
        ({"exclude": ["*.self_attn.*"]}, r"\.mlp\."),
        ({"include": ["*.mlp.*"], "exclude": ["*.gate_proj"]}, r"\.mlp\.(up|down)_proj$"),
        ({"include": ["model.layers.1.*"]}, r"^model\.layers\.1\."),
    ],
)
def test_include_and_exclude_globs(selection, pruned):
    model = tiny_model("llama")
    dense = weights(model)
    report = llmprune.prune(model, tiny_calibration(), method="sparsegpt", **selection)
    expected = sorted(name for name in linears(model) if re.search(pruned, name))
    assert expected
    assert sorted(r.name for r in report.layers) == expected
    for name, module in linears(model).items():
        if name in expected:
            assert sparsity(module) == pytest.approx(0.5), name
        else:
            assert torch.equal(module.weight, dense[f"{name}.weight"]), f"{name} should be untouched"


def test_selection_matching_nothing_is_an_error():
    model = tiny_model("llama")
    dense = weights(model)
    with pytest.raises(UsageError, match=r"'\*\.no_such_layer' matches no linear layer"):
        llmprune.prune(model, tiny_calibration(), include=["*.no_such_layer"])
    with pytest.raises(UsageError, match="nothing to prune"):
        llmprune.prune(model, tiny_calibration(), include=["*.mlp.*"], exclude=["*_proj"])
    assert_unchanged(model, dense)


# --- validation before any work ----------------------------------------------------------------------------


def test_m_not_dividing_the_input_width_is_refused():
    model = tiny_model("llama")  # hidden 64, intermediate 128
    dense = weights(model)
    with pytest.raises(UsageError, match=r"model\.layers\.0\.self_attn\.q_proj.*64.*M=7"):
        llmprune.prune(model, tiny_calibration(), method="wanda", pattern="3:7")
    assert_unchanged(model, dense)


def test_m_not_dividing_a_later_layer_is_refused_before_pruning_earlier_ones():
    config = TINY_CONFIGS["llama"]()
    config.intermediate_size = 72  # down_proj's input: 72 % 16 != 0, while 64 % 16 == 0 elsewhere
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    dense = weights(model)
    with pytest.raises(UsageError, match=r"model\.layers\.0\.mlp\.down_proj.*72"):
        llmprune.prune(model, tiny_calibration(), method="magnitude", pattern="8:16")
    assert_unchanged(model, dense)


def test_calibration_of_mixed_lengths():
    generator = torch.Generator().manual_seed(3)
    lengths = (16, 16, 24, 9, 9, 9, 32)
    rows = [torch.randint(0, 128, (length,), generator=generator) for length in lengths]
    # Consecutive rows of one length form a batch of at most batch_size rows.
    groups = [rows[0:2], rows[2:3], rows[3:5], rows[5:6], rows[6:7]]
    model = tiny_model("llama")
    received, handles = record_layer_inputs(model)
    try:
        report = llmprune.prune(model, (row for row in rows), method="sparsegpt", batch_size=2)
    finally:
        for handle in handles:
            handle.remove()

    assert len(report.layers) == 7 * NUM_LAYERS
    for name, module in linears(model).items():
        assert sparsity(module) == pytest.approx(0.5), name
    for i in range(NUM_LAYERS):
        last = received[i][-len(groups) :]
        assert [tuple(h.shape[:2]) for h in last] == [(len(g), len(g[0])) for g in groups]
        for fed, group in zip(last, groups, strict=True):
            with torch.no_grad():
                expected = model(torch.stack(group), output_hidden_states=True).hidden_states[i]
            assert torch.allclose(fed, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "calibration",
    [
        pytest.param(tiny_calibration().float(), id="float-tensor"),
        pytest.param([row.float() for row in tiny_calibration()], id="float-rows"),
        pytest.param(tiny_calibration()[0], id="1d-tensor"),
        pytest.param([], id="empty"),
    ],
)
def test_bad_calibration_is_a_usage_error(calibration):
    model = tiny_model("llama")
    dense = weights(model)
    with pytest.raises(UsageError):
        llmprune.prune(model, calibration)
    assert_unchanged(model, dense)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_true_sequential_runs_every_batch_through_already_pruned_weights(method):
    """Batches run in lockstep: each linear layer is pruned once, from every batch's statistics, before
    any batch runs it."""
    model = tiny_model("llama")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    zeros_seen: dict[str, list[float]] = {name: [] for name in linears}
    handles = [
        module.register_forward_hook(
            lambda mod, _args, _out, name=name: zeros_seen[name].append(
                float((mod.weight == 0).float().mean())
            )
        )
        for name, module in linears.items()
    ]
    rows = [torch.randint(0, 128, (16,)) for _ in range(5)] + [torch.randint(0, 128, (8,)) for _ in range(3)]
    report = llmprune.prune(model, rows, method=method, true_sequential=True, batch_size=2)
    for handle in handles:
        handle.remove()
    assert len(report.layers) == len(linears)
    for name, seen in zeros_seen.items():
        # 5 batches (5 rows of length 16 in 2, 2, 1; 3 of length 8 in 2, 1): every call saw the pruned weight.
        assert len(seen) == 5, name
        assert all(abs(fraction - 0.5) < 1e-6 for fraction in seen), (name, seen)


# --- non-finite values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "true_sequential"), [("wanda", False), ("sparsegpt", False), ("sparsegpt", True)]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_layer(method, true_sequential, bad):
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = bad
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\b"):
        llmprune.prune(model, tiny_calibration(), method=method, true_sequential=true_sequential)


def test_non_finite_weight_outside_the_targets_names_the_decoder_layer():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="decoder layer 1"):
        llmprune.prune(model, tiny_calibration(), method="wanda", exclude=["*.mlp.*"])


def test_non_finite_calibration_activations():
    model = tiny_model("llama")
    calibration = tiny_calibration()
    model.model.embed_tokens.weight.data[calibration[2, 7]] = float("nan")
    dense = weights(model)
    with pytest.raises(NonFiniteError):
        llmprune.prune(model, calibration, method="sparsegpt")
    # Caught before any layer is pruned (NaN == NaN is False, so compare the finite parts).
    for name, param in model.named_parameters():
        assert torch.equal(param.nan_to_num(), dense[name].nan_to_num()), f"{name} changed"


# --- atomic save -----------------------------------------------------------------------------------------


def _broken_save(path, *args, **kwargs):
    """Stands in for save_pretrained: writes part of a checkpoint, then fails."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(b"half a checkpoint")
    raise OSError("disk full")


def test_save_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(model, "save_pretrained", _broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, tmp_path / "out", {"a": 1})
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def _existing_output(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / METADATA_FILE).write_text("{}")  # an llmprune output: --overwrite replaces only those
    (output / "previous.txt").write_text("previous run")
    return output


def test_save_failure_keeps_the_previous_output(tmp_path, monkeypatch):
    output = _existing_output(tmp_path)
    model = tiny_model("llama")
    monkeypatch.setattr(model, "save_pretrained", _broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, output, {"a": 1}, overwrite=True)
    assert sorted(p.name for p in output.iterdir()) == [METADATA_FILE, "previous.txt"]
    assert list(tmp_path.iterdir()) == [output]


def test_failed_final_rename_keeps_the_previous_output(tmp_path, monkeypatch):
    output = _existing_output(tmp_path)
    real_replace = save_module.os.replace

    def replace(src, dst):
        if str(dst) == str(output) and ".tmp-" in str(src):  # only moving the new checkpoint in fails
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(save_module.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_pruned(tiny_model("llama"), None, output, {"a": 1}, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in output.iterdir()) == [METADATA_FILE, "previous.txt"]
    assert list(tmp_path.iterdir()) == [output]


def test_existing_output_needs_overwrite(tmp_path):
    output = _existing_output(tmp_path)
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="exists"):
        save_pruned(model, None, output, {"a": 1})
    assert sorted(p.name for p in output.iterdir()) == [METADATA_FILE, "previous.txt"]

    assert save_pruned(model, None, output, {"a": 1}, overwrite=True) == output
    names = {p.name for p in output.iterdir()}
    assert "previous.txt" not in names
    assert {"config.json", METADATA_FILE} <= names
    assert json.loads((output / METADATA_FILE).read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [output]
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert torch.equal(
        reloaded.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight
    )


def test_output_that_is_a_file_is_refused(tmp_path):
    output = tmp_path / "out"
    output.write_text("not a directory")
    with pytest.raises(UsageError, match="not a directory"):
        save_pruned(tiny_model("llama"), None, output, {}, overwrite=True)
    assert output.read_text() == "not a directory"


def test_saving_does_not_modify_the_model(tmp_path):
    model = tiny_model("llama")
    llmprune.prune(model, tiny_calibration(), method="magnitude")
    before = copy.deepcopy(weights(model))
    save_pruned(model, None, tmp_path / "out", {})
    assert_unchanged(model, before)


def test_lockstep_meets_in_turn_and_detects_divergent_paths():
    from llmprune.errors import LlmpruneError
    from llmprune.pipeline.lockstep import Lockstep

    lockstep, log = Lockstep(), []

    def task(name: str):
        def run() -> str:
            log.append(f"{name} before")
            lockstep.meet("point", lambda: log.append("action"))
            log.append(f"{name} after")
            return name

        return run

    assert lockstep.run([task("a"), task("b"), task("c")]) == ["a", "b", "c"]
    # Everyone arrives before the action runs once; then all go on, in order.
    assert log == ["a before", "b before", "c before", "action", "a after", "b after", "c after"]

    diverging = Lockstep()
    with pytest.raises(LlmpruneError, match="different paths"):
        diverging.run([lambda: diverging.meet("x", lambda: None), lambda: diverging.meet("y", lambda: None)])

    # A task that fails stops the run with its own error; the tasks paused at a meeting point are unwound.
    failing, unwound = Lockstep(), []

    def paused() -> None:
        try:
            failing.meet("point", lambda: None)
        finally:
            unwound.append(True)

    def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        failing.run([paused, fails])
    assert unwound == [True]


def test_perplexity_reports_progress_and_equals_the_mean_token_loss():
    model = tiny_model("llama")
    windows = tiny_calibration(5, 16, seed=3)
    calls: list[tuple[int, int]] = []
    value = llmprune.perplexity(
        model, windows, batch_size=2, progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]  # 5 windows in batches of 2
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert value == pytest.approx(math.exp(loss.item()), rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear, and GPT-2's transposed Conv1D
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_reported_errors_compare_with_the_dense_weights_and_weights_do_not_share_memory(
    family, dtype, method
):
    """The error of each layer is measured against its dense weights (kept, not overwritten), and the
    pruned weights written back share no memory (SparseGPT solves q/k/v as one matrix)."""
    model = tiny_model(family).to(dtype)
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = llmprune.prune(model, tiny_calibration(), method=method)
    assert all(row.relative_error > 0 for row in report.layers)
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages), "parameters share memory"
    for name, parameter in model.named_parameters():
        assert parameter.dtype == dtype
        if name.endswith("weight") and any(name.startswith(row.name) for row in report.layers):
            assert not torch.equal(parameter, dense[name]), name
    unchanged = llmprune.prune(tiny_model(family).to(dtype), tiny_calibration(), method=method, sparsity=0.0)
    assert all(row.relative_error == 0 for row in unchanged.layers)


# --- the walk and its steps -----------------------------------------------------------------------------


class _Observer:
    """Records, per decoder layer, the inputs, outputs and down_proj input statistics the walk hands it."""

    statistic = "input_norms"
    timing = "observe"

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, list[torch.Tensor], list[torch.Tensor], object]] = []

    def targets(self, index, prefix, layer):
        return {f"{prefix}.mlp.down_proj": layer.mlp.down_proj}

    def apply(self, layer, stats, context):
        (stat,) = stats.values()
        self.seen.append((context.index, context.prefix, list(context.inputs), context.outputs, stat))
        return layer


def test_the_walk_hands_each_step_every_layer_in_order_with_its_inputs_outputs_and_statistics():
    from llmprune.pipeline.walk import walk_layers

    model = tiny_model("llama")
    batches = list(tiny_calibration(6, 16).split(2))
    fed: dict[int, list[torch.Tensor]] = {}

    def record(index: int):
        return lambda _module, args: fed.setdefault(index, []).append(args[0])

    layers = model.model.layers
    handles = [layer.mlp.down_proj.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        final = model.model(torch.cat(batches)).last_hidden_state  # the model's own pass, for reference
    fed.clear()
    observer = _Observer()
    walked = walk_layers(model, batches, [observer])
    for handle in handles:
        handle.remove()
    assert [(index, prefix) for index, prefix, *_ in observer.seen] == [
        (i, f"model.layers.{i}") for i in range(NUM_LAYERS)
    ]
    for index, _, inputs, outputs, stats in observer.seen:
        assert len(inputs) == len(outputs) == len(batches)
        if index + 1 < NUM_LAYERS:  # each layer's outputs are the next one's inputs
            nxt = observer.seen[index + 1][2]
            assert all(torch.equal(a, b) for a, b in zip(outputs, nxt, strict=True))
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in fed[index]]).double()
        assert stats.tokens == 6 * 16
        torch.testing.assert_close(stats.sq_norms, x.square().sum(dim=0), rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat(list(walked.hidden)), torch.cat(observer.seen[-1][3]))
    norm = model.model.norm
    torch.testing.assert_close(norm(torch.cat(list(walked.hidden))), final, rtol=1e-5, atol=1e-5)


class _Shrinker:
    """Replaces each decoder layer by a copy whose MLP output projection is zero (a new, different layer)."""

    statistic = "none"
    timing = "after"

    def targets(self, index, prefix, layer):
        return {f"{prefix}.mlp.down_proj": layer.mlp.down_proj}

    def apply(self, layer, stats, context):
        new = copy.deepcopy(layer)
        new.mlp.down_proj.weight.data.zero_()
        return new


def test_a_step_may_replace_the_layer_and_the_walk_goes_on_with_the_new_one():
    from llmprune.pipeline.walk import walk_layers

    model = tiny_model("llama")
    originals = list(model.model.layers)
    batches = [tiny_calibration(2, 16)]
    walked = walk_layers(model, batches, [_Shrinker()])
    assert all(new is not old for new, old in zip(model.model.layers, originals, strict=True))
    assert all(not layer.mlp.down_proj.weight.any() for layer in model.model.layers)
    with torch.no_grad():
        expected = model.model(batches[0]).last_hidden_state  # the model with the new layers
    torch.testing.assert_close(model.model.norm(walked.hidden[0]), expected, rtol=1e-5, atol=1e-5)


def test_the_readme_step_example_registers_and_prunes_as_it_says(monkeypatch):
    """The README's "adding a per-layer algorithm" example is one class and one registry line: with its
    options, the run takes it (the latest registered), it zeroes exactly half of every down_proj by
    |W|·‖X‖ over the whole matrix, and nothing else changes; other options still take the built-in step."""
    from llmprune import pruning
    from llmprune.pipeline.steps import LinearStep

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("<!-- layer-step example -->\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr(pruning, "STEPS", dict(pruning.STEPS))
    exec(example, {})  # registers ScaledMagnitude in (the copy of) STEPS
    assert list(pruning.STEPS)[-1] == "scaled_magnitude"
    model, calibration = tiny_model("llama"), tiny_calibration()
    dense = copy.deepcopy(model)
    norms: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, args):  # Σx² of down_proj's inputs, on the dense model
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            norms[name] = norms.get(name, 0) + (x * x).sum(0)

        return hook

    projections = [(n, m) for n, m in dense.named_modules() if n.endswith("down_proj")]
    handles = [module.register_forward_pre_hook(record(name)) for name, module in projections]
    with torch.no_grad():
        dense(calibration)
    for handle in handles:
        handle.remove()
    options = llmprune.PruneOptions(method="magnitude", include=["*.down_proj"])
    llmprune.prune(model, calibration, options)
    for (name, after), before in zip(model.named_parameters(), dense.parameters(), strict=True):
        if not name.endswith("down_proj.weight"):
            assert torch.equal(after, before), name
            continue
        kept = after != 0
        assert int((~kept).sum()) >= after.numel() // 2
        # the first layer sees dense inputs: its zeros are exactly the lowest half of |W|·‖X‖
        if ".0." in name:
            scores = before.abs().double() * norms[name.removesuffix(".weight")].sqrt()
            assert scores[~kept].max() <= scores[kept].min()
    assert pruning.STEPS["linear"] is LinearStep
    assert pruning.step_name(llmprune.PruneOptions(method="wanda")) == "linear"
