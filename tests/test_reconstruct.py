"""Block-wise reconstruction (pipeline/reconstruct.py): the zero pattern stays exact, the error falls in
every mode, fp32 master weights for a bf16 layer, nothing but the named linear layers moves, failures put
the start weights back, and processes sharing the batches take the same steps."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from conftest import relative_error, tiny_calibration, tiny_model
from llmprune.config import PruneOptions, build
from llmprune.errors import UsageError
from llmprune.models.architecture import PRUNABLE_TYPES, decoder_layers, sublayer_names
from llmprune.pipeline import reconstruct
from llmprune.pipeline.capture import capture_layer_inputs, run_layer
from llmprune.pipeline.distributed import Communicator
from llmprune.pipeline.reconstruct import (
    OutputTargets,
    ReconstructionSteps,
    SublayerTargets,
    cosine_lr,
    fit_layer,
)
from llmprune.pipeline.steps import LinearStep
from llmprune.pipeline.walk import WalkContext, calibration_batches, walk_layers

MODES = ("layer", "dense", "sublayer")


class HalfByMagnitude:
    """A pruning step of the test's own: zero the half of each linear weight of lowest |W|."""

    statistic, timing = "none", "after"

    def targets(self, index, prefix, layer):
        return {}

    def apply(self, layer, stats, context):
        for module in layer.modules():
            if isinstance(module, PRUNABLE_TYPES):
                weight = module.weight.data
                threshold = weight.abs().float().flatten().kthvalue(weight.numel() // 2).values
                weight[weight.abs() <= threshold] = 0
        return layer



@pytest.fixture(autouse=True)
def errors_on_every_batch(monkeypatch):
    """The fits measure their error on every batch here, so that it can be checked against a direct sum
    (runs measure it on every ``ERROR_EVERY``-th batch, tested below)."""
    monkeypatch.setattr(reconstruct, "ERROR_EVERY", 1)


def batches(nsamples: int = 8) -> list[torch.Tensor]:
    return calibration_batches(tiny_calibration(nsamples=nsamples), 2)


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    path, _ = decoder_layers(model)
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if name.startswith(path) and isinstance(module, PRUNABLE_TYPES)
    }


def pruned_and_fitted(family: str, mode: str | None, steps: int = 12, lr: float = 1e-3, dtype=torch.float32):
    """A tiny model pruned by ``HalfByMagnitude`` through the walk, with reconstruction in ``mode`` (None:
    none); the model, the block reports and the zero masks the pruning step left."""
    model = tiny_model(family).to(dtype)
    masks: dict[str, torch.Tensor] = {}

    class Recording(HalfByMagnitude):
        def apply(self, layer, stats, context):
            super().apply(layer, stats, context)
            for name, module in layer.named_modules():
                if isinstance(module, PRUNABLE_TYPES):
                    masks[f"{context.prefix}.{name}"] = module.weight.data == 0
            return layer

    recon = None if mode is None else ReconstructionSteps(model, mode, steps, lr)
    steps_list = [Recording()] if recon is None else [recon.before, Recording(), recon.after]
    context = WalkContext()
    walk_layers(model, batches(), steps_list, context)
    return model, context.blocks, masks


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_calibration(nsamples=2, seed=5)).logits.float()


@pytest.mark.parametrize("mode", MODES)
def test_zeros_stay_exact_and_the_error_falls_on_llama(mode):
    dense = logits(tiny_model("llama"))
    model, blocks, masks = pruned_and_fitted("llama", mode)
    weights = linear_weights(model)
    assert set(weights) == set(masks)
    for name, weight in weights.items():
        assert torch.equal(weight == 0, masks[name]), name  # the very zeros the pruning left, no others
    assert [r.layer for r in blocks] == [0, 1, 2]
    for report in blocks:
        assert report.restored is None and report.steps == 12
        assert report.error_after < 0.8 * report.error_before, report
    plain, _, _ = pruned_and_fitted("llama", None)
    # The kept weights moved, and the whole model is nearer the dense one than without reconstruction.
    moved = [n for n, w in linear_weights(plain).items() if not torch.equal(w, weights[n])]
    assert len(moved) == len(weights)
    assert relative_error(logits(model), dense) < relative_error(logits(plain), dense)


OTHERS = [("gpt2", "layer"), ("gpt2", "sublayer"), ("gpt_neox", "dense"), ("gpt_neox", "sublayer")]


@pytest.mark.parametrize(("family", "mode"), [*OTHERS, ("opt", "layer"), ("gemma2", "sublayer")])
def test_other_families(family, mode):
    model, blocks, masks = pruned_and_fitted(family, mode)
    for name, weight in linear_weights(model).items():
        assert torch.equal(weight == 0, masks[name]), name
    assert len(blocks) == 3
    for report in blocks:
        assert report.restored is None
        assert 0 < report.error_after < report.error_before


def test_sublayer_refused_where_the_mlp_is_no_module():
    assert sublayer_names(tiny_model("opt")) == ("self_attn", None)
    assert sublayer_names(tiny_model("gpt2")) == ("attn", "mlp")
    with pytest.raises(UsageError, match="sublayer does not apply to opt"):
        ReconstructionSteps(tiny_model("opt"), "sublayer", 4, 1e-3)


@pytest.mark.parametrize(("steps", "lr", "mode"), [(0, 1e-3, "layer"), (4, 0.0, "layer"), (4, -1.0, "dense"),
                                                   (4, float("nan"), "layer"), (4, 1e-3, "block")])
def test_bad_options_refused(steps, lr, mode):
    with pytest.raises(UsageError):
        ReconstructionSteps(tiny_model("llama"), mode, steps, lr)


def test_bf16_layer_keeps_its_dtype_and_zeros_with_fp32_masters():
    model, blocks, masks = pruned_and_fitted("llama", "layer", dtype=torch.bfloat16)
    for name, weight in linear_weights(model).items():
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight == 0, masks[name]), name
    for report in blocks:
        assert report.restored is None and report.error_after < 0.8 * report.error_before


def test_bf16_steps_smaller_than_bf16_resolution_still_add_up():
    """A bf16 layer trained at a tiny learning rate: each step alone would round away in bf16, the fp32
    masters accumulate them (a bf16 optimiser would leave the weights as they were)."""
    _, layer, inputs, calls = first_layer("llama", torch.bfloat16)
    modules = [layer.mlp.down_proj]
    start = layer.mlp.down_proj.weight.detach().clone()
    with torch.no_grad():
        targets = [run_layer(layer, h, c) + 0.05 for h, c in zip(inputs, calls, strict=True)]
    report = fit_layer(layer, inputs, calls, OutputTargets(targets), modules, 40, 2e-5)
    assert report.restored is None
    kept = start != 0  # |w| > 0.01 (the larger half): bf16 steps there are ≥ 6e-5, Adam's ≤ 2e-5
    changed = (layer.mlp.down_proj.weight != start)[kept].float().mean()
    assert changed > 0.3


def test_the_training_forward_sees_the_masked_masters():
    """Inside the optimiser's forwards the trained weight is the (cast) master with the mask applied."""
    _, layer, inputs, calls = first_layer("llama", torch.bfloat16)
    module = layer.mlp.up_proj
    mask = module.weight == 0
    dense = tiny_model("llama").to(torch.bfloat16).model.layers[0]
    with torch.no_grad():
        targets = [run_layer(dense, h, c) for h, c in zip(inputs, calls, strict=True)]
    seen = []

    def check(mod, args):
        if torch.is_grad_enabled():
            weight = mod.weight
            seen.append((weight.requires_grad, weight.dtype, bool((weight[mask] == 0).all())))

    handle = module.register_forward_pre_hook(check)
    try:
        report = fit_layer(layer, inputs, calls, OutputTargets(targets), [module], 6, 1e-3)
    finally:
        handle.remove()
    assert report.restored is None
    assert seen == [(True, torch.bfloat16, True)] * 6


def test_each_sublayer_trains_on_its_own_term():
    """Attention left dense: its term is zero, so its weights stay as they are although the MLP's term
    (whose input comes through the attention) trains the MLP."""
    _, layers = decoder_layers(model := tiny_model("llama"))
    with torch.no_grad():
        captured = capture_layer_inputs(model, layers, batches())
    layer, inputs, calls = layers[0], captured.hidden, captured.calls[0]
    dense = copy.deepcopy(layer)
    HalfByMagnitude().apply(layer.mlp, {}, None)
    start = {name: p.detach().clone() for name, p in layer.named_parameters()}
    modules = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    report = fit_layer(layer, inputs, calls, SublayerTargets(dense, ("self_attn", "mlp")), modules, 6, 1e-3)
    assert report.error_after < report.error_before
    for name, parameter in layer.named_parameters():
        assert torch.equal(parameter, start[name]) == (not name.startswith("mlp.")), name


def first_layer(family: str, dtype=torch.float32):
    """A tiny model, its first decoder layer with half of each linear weight zeroed, that layer's inputs
    and call arguments for 4 batches."""
    model = tiny_model(family).to(dtype)
    _, layers = decoder_layers(model)
    with torch.no_grad():
        captured = capture_layer_inputs(model, layers, batches())
    layer = layers[0]
    HalfByMagnitude().apply(layer, {}, None)
    return model, layer, captured.hidden, captured.calls[0]


def test_only_the_named_modules_move():
    _, layer, inputs, calls = first_layer("llama")
    dense = copy.deepcopy(tiny_model("llama").model.layers[0])
    with torch.no_grad():
        targets = [run_layer(dense, h, c) for h, c in zip(inputs, calls, strict=True)]
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    flags = {name: p.requires_grad for name, p in layer.named_parameters()}
    report = fit_layer(layer, inputs, calls, OutputTargets(targets), [layer.mlp.down_proj], 8, 1e-3)
    assert report.error_after < report.error_before
    for name, parameter in layer.named_parameters():
        assert torch.equal(parameter, before[name]) != (name == "mlp.down_proj.weight"), name
        assert parameter.requires_grad == flags[name]
        assert parameter.grad is None


def test_a_fit_that_does_not_help_is_undone():
    _, layer, inputs, calls = first_layer("llama")
    with torch.no_grad():
        targets = [run_layer(layer, h, c) for h, c in zip(inputs, calls, strict=True)]
    start = {name: p.detach().clone() for name, p in layer.named_parameters()}
    noisy = [t + 0.1 * torch.randn_like(t) for t in targets]
    # A learning rate of 10 throws the weights far off: the error ends above where it started.
    report = fit_layer(layer, inputs, calls, OutputTargets(noisy), [layer.self_attn.q_proj], 4, 10.0)
    assert report.restored is not None and "rose" in report.restored
    assert report.error_after == report.error_before
    for name, parameter in layer.named_parameters():
        assert torch.equal(parameter, start[name]), name
    nan = [t.clone().fill_(float("nan")) for t in targets]
    report = fit_layer(layer, inputs, calls, OutputTargets(nan), [layer.self_attn.q_proj], 4, 1e-3)
    assert report.restored is not None and report.steps == 0
    for name, parameter in layer.named_parameters():
        assert torch.equal(parameter, start[name]), name


def test_error_is_the_relative_norm_over_all_batches():
    _, layer, inputs, calls = first_layer("gpt_neox")
    dense = tiny_model("gpt_neox").gpt_neox.layers[0]
    with torch.no_grad():
        targets = [run_layer(dense, h, c) for h, c in zip(inputs, calls, strict=True)]
        outputs = [run_layer(layer, h, c) for h, c in zip(inputs, calls, strict=True)]
    report = fit_layer(layer, inputs, calls, OutputTargets(targets), [layer.mlp.dense_4h_to_h], 4, 1e-3)
    expected = relative_error(torch.cat(outputs), torch.cat(targets))
    assert report.error_before == pytest.approx(expected, rel=1e-9)
    with torch.no_grad():
        after = [run_layer(layer, h, c) for h, c in zip(inputs, calls, strict=True)]
    assert report.error_after == pytest.approx(relative_error(torch.cat(after), torch.cat(targets)), rel=1e-9)


def test_runs_measure_the_error_on_every_error_every_th_batch(monkeypatch):
    monkeypatch.setattr(reconstruct, "ERROR_EVERY", 2)
    _, layer, inputs, calls = first_layer("gpt_neox")
    assert len(inputs) == 4
    dense = tiny_model("gpt_neox").gpt_neox.layers[0]
    with torch.no_grad():
        targets = [run_layer(dense, h, c) for h, c in zip(inputs, calls, strict=True)]
        outputs = [run_layer(layer, h, c) for h, c in zip(inputs, calls, strict=True)]
    report = fit_layer(layer, inputs, calls, OutputTargets(targets), [layer.mlp.dense_4h_to_h], 4, 1e-3)
    expected = relative_error(torch.cat(outputs[::2]), torch.cat(targets[::2]))
    assert report.error_before == pytest.approx(expected, rel=1e-9)


def test_sublayer_terms_are_each_sublayer_against_its_dense_copy_on_the_same_input():
    _, layer, inputs, calls = first_layer("llama")
    dense = tiny_model("llama").model.layers[0]
    objective = SublayerTargets(dense, ("self_attn", "mlp"))
    with torch.no_grad():
        pairs = objective.terms(layer, lambda: run_layer(layer, inputs[0], calls[0]), 0)
        # First principles: attention sees the normed layer input; the MLP the normed residual after it.
        hidden = inputs[0]
        normed = layer.input_layernorm(hidden)
        kwargs = {k: v for k, v in calls[0].kwargs.items() if k in ("attention_mask", "position_embeddings")}
        attention = layer.self_attn(normed, **kwargs)[0]
        mlp_input = layer.post_attention_layernorm(hidden + attention)
    assert len(pairs) == 2
    torch.testing.assert_close(pairs[0][0], attention)
    torch.testing.assert_close(pairs[0][1], dense.self_attn(normed, **kwargs)[0])
    torch.testing.assert_close(pairs[1][0], layer.mlp(mlp_input))
    torch.testing.assert_close(pairs[1][1], dense.mlp(mlp_input))


def test_cosine_schedule():
    assert cosine_lr(1e-3, 0, 10) == 1e-3
    assert cosine_lr(1e-3, 5, 10) == pytest.approx(5e-4)
    assert 0 < cosine_lr(1e-3, 9, 10) < 3e-5


class _Threads(Communicator):
    """Processes simulated by threads: ``all_reduce`` sums over every thread's tensor."""

    def __init__(self, rank: int, world: int, shared: dict) -> None:
        super().__init__()
        self.rank, self.world_size, self.shared = rank, world, shared

    def all_reduce(self, tensor: torch.Tensor) -> None:
        barrier, slots = self.shared["barrier"], self.shared["slots"]
        slots[self.rank] = tensor.clone()
        barrier.wait()
        total = slots[0].clone()
        for other in slots[1:]:
            total += other
        barrier.wait()
        tensor.copy_(total)


def test_processes_sharing_the_batches_take_the_same_steps():
    _, layer, inputs, calls = first_layer("llama")
    dense = tiny_model("llama").model.layers[0]
    with torch.no_grad():
        targets = [run_layer(dense, h, c) for h, c in zip(inputs, calls, strict=True)]

    def fit(copy_of, lo, hi, comm, total):
        modules = [m for m in copy_of.modules() if isinstance(m, nn.Linear)]
        objective = OutputTargets(targets[lo:hi])
        return fit_layer(copy_of, inputs[lo:hi], calls[lo:hi], objective, modules, 6, 1e-3, comm, lo, total)

    alone = copy.deepcopy(layer)
    single = fit(alone, 0, 4, Communicator(), None)
    shared = {"barrier": threading.Barrier(2), "slots": [None, None]}
    copies, reports = [copy.deepcopy(layer), copy.deepcopy(layer)], [None, None]
    shares = [(0, 1), (1, 4)]  # an uneven share: step t on global batch t mod 4 wherever it lives

    def work(rank):
        torch.set_num_threads(1)
        lo, hi = shares[rank]
        reports[rank] = fit(copies[rank], lo, hi, _Threads(rank, 2, shared), 4)

    workers = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for report in reports:
        assert report.error_before == pytest.approx(single.error_before, rel=1e-9)
        assert report.error_after == pytest.approx(single.error_after, rel=1e-9)
    for name, parameter in alone.named_parameters():
        one, two = (dict(c.named_parameters())[name] for c in copies)
        assert torch.equal(one, two), name
        torch.testing.assert_close(one, parameter, rtol=1e-6, atol=1e-7)


def test_dense_mode_refuses_to_start_past_layer_zero():
    model = tiny_model("llama")
    recon = ReconstructionSteps(model, "dense", 2, 1e-3)

    class SkipFirst:
        def __init__(self, step):
            self.step, self.statistic, self.timing = step, step.statistic, step.timing

        def targets(self, index, prefix, layer):
            return None if index == 0 else self.step.targets(index, prefix, layer)

        def apply(self, layer, stats, context):
            return self.step.apply(layer, stats, context)

    with pytest.raises(UsageError, match="needs its dense stream"):
        walk_layers(model, batches(), [SkipFirst(recon.before), HalfByMagnitude(), SkipFirst(recon.after)])


def test_with_wanda_through_the_walk_and_the_plan_as_modules():
    """The way the lead wires it: ``[before, LinearStep, after]``, training the pruning step's targets."""
    model = tiny_model("qwen2")
    options = build(PruneOptions, {"method": "wanda", "batch_size": 2})
    linear = LinearStep(model, options)
    recon = ReconstructionSteps(
        model, "dense", 8, 1e-3, lambda index, prefix, layer: [t.module for t in linear.plan[index]]
    )
    context = WalkContext(Communicator(), stride=4, first_batch=0, total_batches=4)
    walk_layers(model, batches(), [recon.before, linear, recon.after], context)
    blocks = context.blocks
    assert len(context.rows) == 7 * 3
    for row in context.rows:
        weight = model.get_submodule(row.name).weight
        assert int((weight == 0).sum()) == weight.numel() // 2  # Wanda's 50 % per row, kept exactly
    assert [r.layer for r in blocks] == [0, 1, 2]
    assert all(r.error_after < r.error_before for r in blocks)
