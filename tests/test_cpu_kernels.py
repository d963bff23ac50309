"""The compiled CPU sparse kernels against first principles: ``F.linear`` on the dense-with-zeros weight,
for every instruction-set path (forced through ``LLMPRUNE_CPU_KERNEL``), every thread count, odd shapes,
empty rows, 0 % and 99 % sparsity, bfloat16 values and non-contiguous inputs. The AVX-512 path also runs
built with its intrinsics as plain C (``csrc/avx512_emulated.h``), so its logic is proven on every x86 CPU,
not only where AVX-512 is."""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmprune
from conftest import relative_error
from llmprune.errors import UsageError
from llmprune.inference import cpu_kernels, sparse_linear
from llmprune.inference.sparse_linear import SPARSE_TOKENS, SparseLinear

native = pytest.importorskip("llmprune._sparse_cpu", reason="the compiled CPU kernels are not built")
SUPPORTED = native.supported()


SOURCE = Path(llmprune.__file__).parent / "csrc" / "sparse_cpu.c"
EMULATED = "avx512-emulated"


@pytest.fixture(scope="session")
def emulated_avx512(tmp_path_factory):
    """The kernels built with ``-DLLMPRUNE_EMULATE_AVX512`` (by the compiler that built Python) and loaded
    under the real module's name, which they replace in the tests that ask for them."""
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    linux_x86_64 = sys.platform.startswith("linux") and platform.machine().lower() == "x86_64"
    if not linux_x86_64 or not SOURCE.exists() or not shutil.which(compiler[0]):
        pytest.skip("the emulated AVX-512 build needs Linux on x86-64, the C source and a C compiler")
    built = tmp_path_factory.mktemp("emulated") / f"_sparse_cpu{sysconfig.get_config_var('EXT_SUFFIX')}"
    build = subprocess.run([*compiler, "-O1", "-std=c11", "-pthread", "-shared", "-fPIC",
                            "-DLLMPRUNE_EMULATE_AVX512", f"-I{sysconfig.get_paths()['include']}", str(SOURCE),
                            "-o", str(built), "-ldl", "-lm"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    spec = importlib.util.spec_from_file_location("llmprune._sparse_cpu", built)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "avx512" in module.supported()
    return module


@pytest.fixture(params=[*cpu_kernels.ISAS, EMULATED])
def isa(request, monkeypatch):
    """Each instruction-set path in turn, forced as a user would (skipped where this CPU lacks it), and the
    AVX-512 path once more with its intrinsics emulated (``emulated_avx512``)."""
    path = request.param
    if path == EMULATED:
        module = request.getfixturevalue("emulated_avx512")
        monkeypatch.setitem(sys.modules, "llmprune._sparse_cpu", module)
        monkeypatch.setattr(llmprune, "_sparse_cpu", module)
        path = "avx512"
    elif path not in SUPPORTED:
        pytest.skip(f"this CPU has no {path} (it runs {', '.join(SUPPORTED)})")
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, path)
    cpu_kernels.reset_isa()
    assert cpu_kernels.isa() == path
    yield path
    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE)
    cpu_kernels.reset_isa()


THREAD_BACKENDS = native.thread_backends()


@pytest.fixture(params=[(1, "pool"), (2, "pool"), (3, "pool"), (2, "openmp"), (3, "openmp")],
                ids=["1", "2-pool", "3-pool", "2-openmp", "3-openmp"])
def threads(request, monkeypatch):
    """Thread counts on each thread backend, forced as a user would (skipped where there is no OpenMP)."""
    count, backend = request.param
    if backend not in THREAD_BACKENDS:
        pytest.skip(f"no OpenMP runtime in this process (backends: {', '.join(THREAD_BACKENDS)})")
    monkeypatch.setenv(cpu_kernels.THREADS_VARIABLE, backend)
    cpu_kernels.reset_isa()
    assert cpu_kernels.thread_backend() == backend
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    yield count
    torch.set_num_threads(before)
    monkeypatch.delenv(cpu_kernels.THREADS_VARIABLE)
    cpu_kernels.reset_isa()


def sparse_weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight[torch.rand(rows, cols, generator=generator) < sparsity] = 0
    return weight



SHAPES = [(1, 1), (7, 13), (37, 70), (64, 64), (129, 200), (256, 1000), (300, 576)]


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_matmul_equals_f_linear_on_every_path_and_thread_count(isa, threads, rows, cols, sparsity):
    weight = sparse_weight(rows, cols, sparsity)
    weight[rows // 2] = 0  # a row with no kept weight
    layout = cpu_kernels.from_dense(weight)
    for tokens in (1, 2, 3, 5, 8, 11, 16, 33):
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
        got = cpu_kernels.matmul(layout, x)
        expected = F.linear(x.double(), weight.double())
        assert got.dtype == torch.float32 and got.shape == (tokens, rows)
        assert relative_error(got, expected) <= 1e-5, (tokens, relative_error(got, expected))
        assert torch.all(got[:, rows // 2] == 0)


def test_a_large_layer_splits_over_threads_and_agrees(isa, threads):
    weight = sparse_weight(1031, 777, 0.6, seed=3)
    layout = cpu_kernels.from_dense(weight)
    x = torch.randn(4, 777)
    assert relative_error(cpu_kernels.matmul(layout, x), F.linear(x.double(), weight.double())) <= 1e-5
    assert torch.equal(cpu_kernels.to_dense(layout), weight)


@pytest.mark.parametrize("dtype", cpu_kernels.VALUE_DTYPES)
@pytest.mark.parametrize("rows", [3, 5, 6, 7, 13, 63, 66, 67])
@pytest.mark.parametrize("tokens", [1, 3, 7, 9])
@pytest.mark.parametrize("sparsity", [0.1, 0.7])
def test_each_output_agrees_row_by_row_and_token_by_token(isa, threads, dtype, rows, tokens, sparsity):
    """The kernels walk several rows side by side (one token; with the lean or the full prefetches, by
    density) or tiles of rows and tokens (more), and the rows and tokens left over one by one: each output
    on its own within float32 rounding of its own sum (a row or token skipped, doubled or swapped fails)."""
    weight = sparse_weight(rows, 300, sparsity, seed=rows).to(dtype)
    weight[rows - 1] = 0
    layout = cpu_kernels.from_dense(weight)
    x = torch.randn(tokens, 300, generator=torch.Generator().manual_seed(tokens))
    got = cpu_kernels.matmul(layout, x).double()
    exact = weight.double()
    expected = F.linear(x.double(), exact)
    bound = 1e-5 * (x.double().abs() @ exact.abs().T)
    assert torch.all((got - expected).abs() <= bound), (got - expected).abs().max()
    assert torch.all(got[:, rows - 1] == 0)


@pytest.mark.parametrize("rows,cols", [(5, 9), (64, 128), (129, 200)])
def test_bfloat16_values_accumulate_in_float32(isa, rows, cols):
    weight = sparse_weight(rows, cols, 0.5).to(torch.bfloat16)
    layout = cpu_kernels.from_dense(weight)
    assert layout.values.dtype == torch.bfloat16
    for x in (torch.randn(3, cols), torch.randn(3, cols).to(torch.bfloat16)):
        expected = F.linear(x.double(), weight.double())  # the bf16 weights exactly, in float64
        assert relative_error(cpu_kernels.matmul(layout, x), expected) <= 1e-5


@pytest.mark.parametrize("dtype", cpu_kernels.VALUE_DTYPES)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_to_dense_rebuilds_the_weight_bit_for_bit(isa, threads, dtype, rows, cols):
    weight = sparse_weight(rows, cols, 0.7).to(dtype)
    layout = cpu_kernels.from_dense(weight)
    scratch = torch.full((rows * cols + 17,), 5.0, dtype=dtype)  # a reused buffer holding old values
    assert torch.equal(cpu_kernels.to_dense(layout, scratch), weight)


@pytest.mark.parametrize("dtype", cpu_kernels.VALUE_DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (31, 64), (33, 70), (67, 200), (300, 576), (70, 2200)])
def test_many_token_kernel_agrees_output_by_output(isa, threads, dtype, rows, cols):
    """Blocks of 64 tokens (a last one of 32 or 48 when that holds the rest) against panels of 32 rows in
    groups of two, inputs in chunks of 32 mask words, and what is left of each: every output within float32
    rounding of its own sum, for token counts around the block sizes."""
    weight = sparse_weight(rows, cols, 0.6, seed=rows).to(dtype)
    weight[rows // 2] = 0
    layout = cpu_kernels.from_dense(weight)
    exact = weight.double()
    for tokens in (17, 32, 33, 48, 49, 63, 64, 65, 96, 97, 112, 113, 130):
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
        got = cpu_kernels.multiply_many(*layout.tensors(), x, rows).double()
        expected = F.linear(x.double(), exact)
        bound = 1e-5 * (x.double().abs() @ exact.abs().T)
        assert got.shape == (tokens, rows)
        assert torch.all((got - expected).abs() <= bound), (tokens, (got - expected).abs().max())
        assert torch.all(got[:, rows // 2] == 0)


def test_many_token_blocks_are_wide_but_the_last_the_narrowest_that_holds_the_rest():
    blocks = cpu_kernels.many_blocks
    assert blocks(20, 64, 32, 48) == [(0, 20, 32)]
    assert blocks(32, 64, 32, 48) == [(0, 32, 32)]
    assert blocks(33, 64, 32, 48) == [(0, 33, 48)]
    assert blocks(48, 64, 32, 48) == [(0, 48, 48)]
    assert blocks(49, 64, 32, 48) == [(0, 49, 64)]
    assert blocks(128, 64, 32, 48) == [(0, 128, 64)]
    assert blocks(129, 64, 32, 48) == [(0, 128, 64), (128, 129, 32)]
    assert blocks(170, 64, 32, 48) == [(0, 128, 64), (128, 170, 48)]
    assert blocks(177, 64, 32, 48) == [(0, 177, 64)]
    assert cpu_kernels._native().many_blocks() == (64, 32, 48)


@pytest.mark.parametrize("tokens,tail", [(40, 32), (64, 32), (20, 16), (70, 64)])
def test_the_kernel_refuses_a_last_block_that_cannot_hold_the_rest(tokens, tail):
    layout = cpu_kernels.from_dense(sparse_weight(8, 64, 0.5))
    packed, out = torch.zeros(2 * 64 * 64), torch.empty(tokens, 8)
    with pytest.raises(ValueError, match=f"^no last block of {tail} tokens for {tokens} tokens$"):
        cpu_kernels._native().matmul_many(*cpu_kernels._pointers(layout), packed.data_ptr(),
                                          out.data_ptr(), 8, 64, tokens, tail, 0, 1)


@pytest.mark.parametrize("sparsity", [0.0, 0.99])
def test_many_token_kernel_on_large_strided_and_bfloat16_inputs(isa, threads, sparsity):
    weight = sparse_weight(1031, 777, sparsity, seed=4)
    layout = cpu_kernels.from_dense(weight)
    wide = torch.randn(100, 900)
    for x in (wide[:, 50:827], wide[:, :777].to(torch.bfloat16), torch.randn(777, 70).t()):
        expected = F.linear(x.double(), weight.double())
        assert relative_error(cpu_kernels.multiply_many(*layout.tensors(), x, 1031), expected) <= 1e-5


def test_non_contiguous_and_strided_inputs(isa):
    weight = sparse_weight(48, 80, 0.5)
    layout = cpu_kernels.from_dense(weight)
    wide = torch.randn(6, 200)
    for x in (wide[:, 40:120], torch.randn(80, 6).t(), wide[::2, :80], torch.randn(80).expand(4, 80)):
        assert relative_error(cpu_kernels.matmul(layout, x), F.linear(x.double(), weight.double())) <= 1e-5


def test_sparse_linear_matches_linear_for_decode_and_prefill(isa):
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(sparse_weight(40, 96, 0.5))
    module = SparseLinear.from_dense(linear.weight, linear.bias)
    for tokens in (1, SPARSE_TOKENS, SPARSE_TOKENS + 1, 70):  # kernel twice, then many-token kernel or expand
        x = torch.randn(2, tokens, 96)
        with torch.no_grad():
            assert relative_error(module(x), linear(x)) <= 1e-5
    assert module.dense_weight().equal(linear.weight.detach())


def test_decoding_reads_the_bound_weight_and_matches_linear(isa, monkeypatch):
    """Few contiguous float32 tokens whose width is whole mask words take the bound path (its pointers read
    once); other inputs take the general one; both equal F.linear."""
    calls = []
    bound_multiply = sparse_linear.multiply_bound
    monkeypatch.setattr(sparse_linear, "multiply_bound",
                        lambda *a: calls.append(a[1].shape) or bound_multiply(*a))
    linear = torch.nn.Linear(128, 40)
    with torch.no_grad():
        linear.weight.copy_(sparse_weight(40, 128, 0.5, seed=7))
    module = SparseLinear.from_dense(linear.weight, linear.bias)
    wide = torch.randn(2, 3, 256)
    inputs = [torch.randn(2, 3, 128), torch.randn(128), wide[..., :128], torch.randn(2, 3, 128).bfloat16(),
              torch.randn(SPARSE_TOKENS + 1, 128)]
    with torch.no_grad():
        for x in inputs:
            got, expected = module(x), linear(x.float())
            assert got.shape == expected.shape
            assert relative_error(got.float(), expected) <= (1e-5 if x.dtype is torch.float32 else 1e-2)
    assert calls == [(2, 3, 128), (128,)]  # not the strided, bfloat16 or many-token inputs


def test_the_bound_weight_follows_copies_and_replaced_buffers(isa):
    weight = sparse_weight(40, 128, 0.5, seed=8)
    module = SparseLinear.from_dense(weight)
    x = torch.randn(1, 128)
    expected = F.linear(x.double(), weight.double())
    assert relative_error(module(x), expected) <= 1e-5  # binds the weight
    twin = copy.deepcopy(module)
    module.values.zero_()  # a twin still reading the original's values would now give zeros
    assert relative_error(twin(x), expected) <= 1e-5
    assert torch.all(module(x) == 0)
    module.values = twin.values.clone()  # a new buffer: bound again
    assert relative_error(module(x), expected) <= 1e-5


@pytest.mark.parametrize("dtype", cpu_kernels.VALUE_DTYPES)
@pytest.mark.parametrize("limits", [(0, 0.6), (1 << 40, 0.6), (0, 0.4), None])
@pytest.mark.parametrize("torch_bf16", [None, "avx512_bf16", "amx"])
def test_prefill_runs_the_many_token_kernel_where_its_limits_say(isa, monkeypatch, limits, torch_bf16, dtype):
    table = {} if limits is None else {(cpu_kernels.isa(), dtype): limits}
    monkeypatch.setattr(sparse_linear, "MANY_TOKENS_LIMITS", table)
    monkeypatch.setattr(sparse_linear, "torch_bfloat16_isa", lambda: torch_bf16)
    monkeypatch.setattr(sparse_linear, "amx_available", lambda: False)
    monkeypatch.setattr(sparse_linear, "dpbf16_available", lambda: False)
    calls = []
    many = sparse_linear.multiply_many
    monkeypatch.setattr(sparse_linear, "multiply_many", lambda *a: calls.append(a[3].shape) or many(*a))
    linear = torch.nn.Linear(130, 70).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(sparse_weight(70, 130, 0.5, seed=6))
    module = SparseLinear.from_dense(linear.weight, linear.bias)
    tolerance = 1e-5 if dtype is torch.float32 else 1e-2  # bfloat16 outputs
    for tokens in (SPARSE_TOKENS, SPARSE_TOKENS + 1, 100):
        x = torch.randn(tokens, 130).to(dtype)
        with torch.no_grad():
            assert relative_error(module(x).double(), linear(x).double()) <= tolerance
    assert 0.4 < module.weight_layout.density < 0.6  # within (0, 0.6) only
    runs = limits == (0, 0.6) and not (torch_bf16 and dtype is torch.bfloat16)
    assert calls == ([(SPARSE_TOKENS + 1, 130), (100, 130)] if runs else [])


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("avx512_bf16", [False, True])
def test_torch_bfloat16_isa_follows_the_cpu_and_onednn_cap(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    best = "amx" if amx else "avx512_bf16" if avx512_bf16 else None
    for cap, expected in (
        (None, best),
        ("ALL", best),
        ("avx512_core_amx", best),
        ("AVX512_CORE_BF16", "avx512_bf16" if avx512_bf16 else None),
        ("AVX10_1_512", "avx512_bf16" if avx512_bf16 else None),
        ("AVX512_CORE_VNNI", None),
        ("AVX2", None),
    ):
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert cpu_kernels.torch_bfloat16_isa() == expected, cap


@pytest.mark.parametrize("kernel_isa", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype", cpu_kernels.VALUE_DTYPES)
@pytest.mark.parametrize("many", [True, False])
def test_the_path_for_each_token_count(monkeypatch, kernel_isa, dtype, many):
    """The sparse kernel up to SPARSE_TOKENS tokens, then the many-token kernel where it runs; else float32
    with AVX-512 keeps the sparse kernel up to AVX512_SPARSE_TOKENS, and the rest expands."""
    monkeypatch.setattr(sparse_linear, "isa", lambda: kernel_isa)
    monkeypatch.setattr(sparse_linear, "amx_available", lambda: False)
    monkeypatch.setattr(sparse_linear, "dpbf16_available", lambda: False)
    module = SparseLinear.from_dense(sparse_weight(40, 96, 0.5).to(dtype))
    monkeypatch.setattr(SparseLinear, "uses_many_tokens_kernel", lambda self: many)
    wide = kernel_isa == "avx512" and dtype is torch.float32
    for tokens, expected in [
        (1, sparse_linear.SPARSE_KERNEL),
        (SPARSE_TOKENS, sparse_linear.SPARSE_KERNEL),
        (SPARSE_TOKENS + 1, sparse_linear.SPARSE_KERNEL if wide else sparse_linear.EXPAND),
        (sparse_linear.AVX512_SPARSE_TOKENS, sparse_linear.SPARSE_KERNEL if wide else sparse_linear.EXPAND),
        (sparse_linear.AVX512_SPARSE_TOKENS + 1, sparse_linear.EXPAND),
    ]:
        if many and tokens > SPARSE_TOKENS:
            expected = sparse_linear.MANY_TOKENS_KERNEL
        assert module.path(tokens) == expected, tokens


@pytest.mark.parametrize("rows,cols", [(203, 96), (96, 203)])
def test_prefill_in_panels_of_rows_matches_linear(isa, monkeypatch, rows, cols):
    monkeypatch.setattr(SparseLinear, "uses_many_tokens_kernel", lambda self: False)
    monkeypatch.setattr(sparse_linear, "PANEL_BYTES", 40 * cols)  # 10 rows of float32
    monkeypatch.setattr(sparse_linear, "PANEL_MIN_ROWS", 12)  # ... too few: panels of 12, the last one short
    linear = torch.nn.Linear(cols, rows)
    with torch.no_grad():
        linear.weight.copy_(sparse_weight(rows, cols, 0.5, seed=5))
    module = SparseLinear.from_dense(linear.weight, linear.bias)
    assert sparse_linear.panel_rows(module.weight_layout) == 12
    assert sparse_linear.panel_rows(cpu_kernels.row_block(module.weight_layout, 0, 9)) == 9  # one panel
    bf16 = cpu_kernels.from_dense(linear.weight.detach().to(torch.bfloat16))
    assert sparse_linear.panel_rows(bf16) == rows  # expanded whole
    x = torch.randn(3, 30, cols)
    with torch.no_grad():
        assert relative_error(module(x), linear(x)) <= 1e-5
    block = cpu_kernels.row_block(module.weight_layout, 7, 19)
    assert torch.equal(cpu_kernels.to_dense(block), linear.weight.detach()[7:19])


def test_two_python_threads_calling_at_once_get_their_own_results(threads):
    weights = [sparse_weight(700, 300, 0.5, seed=s) for s in range(2)]
    layouts = [cpu_kernels.from_dense(w) for w in weights]
    x = torch.randn(8, 300)
    errors: list[float] = []

    def work(index: int) -> None:
        for _ in range(20):
            got = cpu_kernels.matmul(layouts[index], x)
            errors.append(relative_error(got, F.linear(x.double(), weights[index].double())))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(errors) == 40 and max(errors) <= 1e-5


def test_a_forked_child_runs_the_threaded_kernels(tmp_path):
    script = (
        "import os, torch\n"
        "from llmprune.inference import cpu_kernels as k\n"
        "torch.set_num_threads(2)\n"
        "w = torch.randn(2000, 300); w[w.abs() < 0.7] = 0\n"
        "layout = k.from_dense(w); x = torch.randn(4, 300)\n"
        "expected = k.matmul(layout, x)\n"  # the parent's threads are started
        "pid = os.fork()\n"
        "if pid == 0:\n"  # only the kernels in the child: torch's own OpenMP team is not fork-safe
        "    os._exit(0 if k.matmul(layout, x).equal(expected) and k.thread_backend() == 'pool' else 1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    result = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_best_supported_path_is_the_default(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE, raising=False)
    cpu_kernels.reset_isa()
    assert cpu_kernels.isa() == SUPPORTED[0]
    assert SUPPORTED[-1] == "portable"


def test_torchs_openmp_team_is_the_default_thread_backend(monkeypatch):
    monkeypatch.delenv(cpu_kernels.THREADS_VARIABLE, raising=False)
    cpu_kernels.reset_isa()
    assert cpu_kernels.thread_backend() == THREAD_BACKENDS[0]
    if "OpenMP" in torch.__config__.parallel_info():
        assert THREAD_BACKENDS == ["openmp", "pool"]


def test_forcing_an_unknown_thread_backend_is_one_line(monkeypatch):
    monkeypatch.setenv(cpu_kernels.THREADS_VARIABLE, "tbb")
    cpu_kernels.reset_isa()
    with pytest.raises(UsageError, match="CPU_THREADS='tbb': expected one of openmp, pool"):
        cpu_kernels.thread_backend()
    monkeypatch.delenv(cpu_kernels.THREADS_VARIABLE)
    cpu_kernels.reset_isa()


def test_forcing_an_unknown_or_unsupported_path_is_one_line(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "sse9")
    cpu_kernels.reset_isa()
    with pytest.raises(UsageError, match="CPU_KERNEL='sse9': expected one of avx512, avx2, portable"):
        cpu_kernels.isa()
    missing = [name for name in cpu_kernels.ISAS if name not in SUPPORTED]
    if missing:
        monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, missing[0])
        cpu_kernels.reset_isa()
        with pytest.raises(UsageError, match="this CPU supports only"):
            cpu_kernels.isa()
    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE)
    cpu_kernels.reset_isa()


@pytest.mark.parametrize("broken", ["matmul", "matmul_many"])
def test_a_path_that_disagrees_with_the_portable_one_is_refused(broken):
    class Broken:
        """The module with a wrong fast path ("fake"): its ``broken`` kernel leaves zeros in the output."""

        name = "fake"

        def select(self, name):
            self.name = name

        def selected(self):
            return self.name

        def many_blocks(self):
            return native.many_blocks()

        def run(self, kernel, out, rows, tokens, *args):
            native.select("portable")
            getattr(native, kernel)(*args)
            if self.name == "fake" and kernel == broken:
                ctypes.memset(out, 0, rows * tokens * 4)

        def matmul(self, *args):
            self.run("matmul", args[5], args[6], args[8], *args)

        def matmul_many(self, *args):
            self.run("matmul_many", args[4], args[5], args[7], *args)

    try:
        with pytest.raises(RuntimeError, match="fake CPU kernels disagree with the portable ones"):
            cpu_kernels._check_selected(Broken())
    finally:
        cpu_kernels.reset_isa()


@pytest.mark.parametrize("dtype", cpu_kernels.VALUE_DTYPES)
def test_the_compiled_packing_matches_the_layout_of_first_principles(threads, dtype):
    weight = sparse_weight(301, 130, 0.5).to(dtype)
    weight[4] = 0
    weight[7, 3], weight[7, 5], weight[9, 1] = -0.0, float("nan"), float("inf")  # -0.0 is a zero
    layout = cpu_kernels.from_dense(weight)
    bits = weight != 0
    expected = cpu_kernels._from_bits(bits, weight[bits])
    assert torch.equal(layout.mask, expected.mask) and torch.equal(layout.offsets, expected.offsets)
    assert torch.equal(layout.values.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       expected.values.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert layout.values.numel() == int(bits.sum()) + cpu_kernels.PAD


def test_the_openmp_spin_note_follows_backend_threads_and_the_wait_policy(monkeypatch):
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch here does not run on OpenMP")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.setenv(cpu_kernels.THREADS_VARIABLE, "openmp")
        cpu_kernels.reset_isa()
        assert cpu_kernels.thread_contention() is None  # on torch's own team nothing competes
        monkeypatch.setenv(cpu_kernels.THREADS_VARIABLE, "pool")
        cpu_kernels.reset_isa()
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        assert "OMP_WAIT_POLICY=PASSIVE" in cpu_kernels.thread_contention()
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
        assert cpu_kernels.thread_contention() is None
        monkeypatch.delenv("OMP_WAIT_POLICY")
        torch.set_num_threads(1)
        assert cpu_kernels.thread_contention() is None
    finally:
        torch.set_num_threads(before)
        monkeypatch.delenv(cpu_kernels.THREADS_VARIABLE, raising=False)
        cpu_kernels.reset_isa()


AMX = pytest.mark.skipif("amx" not in native.panel_engines(),
                         reason="no AMX tiles for this process on this CPU or OS")
DPBF16 = pytest.mark.skipif("avx512_bf16" not in native.panel_engines(), reason="no AVX-512 BF16 on this CPU")
PANEL_KERNELS = {  # by engine: multiply, availability, the variable that turns it off, path
    "amx": (cpu_kernels.multiply_amx, "amx_available", cpu_kernels.AMX_VARIABLE, sparse_linear.AMX_KERNEL),
    "avx512_bf16": (cpu_kernels.multiply_dpbf16, "dpbf16_available", cpu_kernels.DPBF16_VARIABLE,
                    sparse_linear.DPBF16_KERNEL),
}
EACH_PANEL_KERNEL = pytest.mark.parametrize("panels", [pytest.param("amx", marks=AMX),
                                                       pytest.param("avx512_bf16", marks=DPBF16)])


def bfloat16_reference(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the panel kernels compute: bfloat16 weights and inputs, exact products, summed (in float64)."""
    return F.linear(x.to(torch.bfloat16).double(), weight.to(torch.bfloat16).double())


@EACH_PANEL_KERNEL
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 13), (37, 70), (64, 64), (65, 33), (129, 200), (300, 576)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_panel_kernel_equals_f_linear_on_bfloat16_for_every_thread_count(threads, panels, rows, cols,
                                                                         sparsity):
    multiply = PANEL_KERNELS[panels][0]
    weight = sparse_weight(rows, cols, sparsity, seed=rows + cols).to(torch.bfloat16)
    weight[rows // 2] = 0  # a row with no kept weight
    layout = cpu_kernels.from_dense(weight)
    for tokens in (1, 4, 8, 9, 15, 16, 17, 24, 25, 33, 100):  # last token tiles of 1-8 (half) and 9-16
        x = torch.randn(tokens, cols).to(torch.bfloat16)
        got = multiply(*layout.tensors(), x, rows)
        assert got.dtype is torch.float32 and got.shape == (tokens, rows)
        assert relative_error(got.double(), bfloat16_reference(weight, x)) <= 1e-5, tokens


@EACH_PANEL_KERNEL
def test_panel_kernel_each_output_on_strided_and_float32_inputs(panels):
    multiply = PANEL_KERNELS[panels][0]
    weight = sparse_weight(97, 130, 0.6, seed=3).to(torch.bfloat16)
    layout = cpu_kernels.from_dense(weight)
    wider = torch.randn(40, 150).to(torch.bfloat16)
    for x in (wider[:, :130], wider[:, 10:140].float(), torch.randn(130, 40).to(torch.bfloat16).T):
        got = multiply(*layout.tensors(), x, 97).double()
        expected = bfloat16_reference(weight, x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@AMX
def test_torchs_own_bfloat16_matmul_is_unchanged_after_the_amx_kernel():
    """The kernel restores the tile configuration it found (oneDNN keeps its own on the thread)."""
    weight = sparse_weight(256, 512, 0.5, seed=4).to(torch.bfloat16)
    x = torch.randn(64, 512).to(torch.bfloat16)
    before = F.linear(x, weight)
    cpu_kernels.multiply_amx(*cpu_kernels.from_dense(weight).tensors(), x, 256)
    assert torch.equal(F.linear(x, weight), before)


@pytest.mark.parametrize("panels", list(PANEL_KERNELS))
def test_a_panel_kernel_runs_only_on_the_avx512_path_and_can_be_turned_off(monkeypatch, panels):
    _, available_name, variable, _ = PANEL_KERNELS[panels]
    available = getattr(cpu_kernels, available_name)
    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE, raising=False)
    monkeypatch.delenv(variable, raising=False)
    cpu_kernels.reset_isa()
    assert available() is (cpu_kernels.isa() == "avx512" and panels in native.panel_engines())
    monkeypatch.setenv(variable, "0")
    assert available() is False
    monkeypatch.delenv(variable)
    for forced in ("avx2", "portable"):
        if forced in SUPPORTED:
            monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, forced)
            cpu_kernels.reset_isa()
            assert available() is False
    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE, raising=False)
    cpu_kernels.reset_isa()


@pytest.mark.parametrize("dtype", cpu_kernels.VALUE_DTYPES)
@pytest.mark.parametrize("amx,dpbf16", [(True, False), (False, True), (True, True)])
def test_bfloat16_weights_take_a_panel_kernel_for_its_token_counts(monkeypatch, dtype, amx, dpbf16):
    """AMX where it runs, for AMX_TOKENS; else AVX-512 BF16, for DPBF16_TOKENS; else the other paths."""
    monkeypatch.setattr(sparse_linear, "amx_available", lambda: amx)
    monkeypatch.setattr(sparse_linear, "dpbf16_available", lambda: dpbf16)
    monkeypatch.setattr(SparseLinear, "uses_many_tokens_kernel", lambda self: False)
    module = SparseLinear.from_dense(sparse_weight(40, 96, 0.5).to(dtype))
    limits = sorted({*sparse_linear.AMX_TOKENS, *sparse_linear.DPBF16_TOKENS})
    for tokens in (1, SPARSE_TOKENS + 1, *(limit + step for limit in limits for step in (-1, 0, 1))):
        expected = None
        if dtype is torch.bfloat16:
            low, high = sparse_linear.AMX_TOKENS if amx else sparse_linear.DPBF16_TOKENS
            if low <= tokens <= high:
                expected = sparse_linear.AMX_KERNEL if amx else sparse_linear.DPBF16_KERNEL
        path = module.path(tokens)
        if expected is None:
            assert path not in (sparse_linear.AMX_KERNEL, sparse_linear.DPBF16_KERNEL), tokens
        else:
            assert path == expected, tokens


@pytest.mark.parametrize("dtype", cpu_kernels.VALUE_DTYPES)
@pytest.mark.parametrize("panels", [None, "amx", "avx512_bf16"])
def test_the_probe_token_counts_reach_every_path_once(monkeypatch, dtype, panels):
    """What the swap's check runs: with a panel kernel, bfloat16 layers reach the sparse kernel, the panel
    kernel and expanding; otherwise the sparse kernel and the prefill path, at the counts the check always
    used."""
    monkeypatch.setattr(sparse_linear, "amx_available", lambda: panels == "amx")
    monkeypatch.setattr(sparse_linear, "dpbf16_available", lambda: panels == "avx512_bf16")
    module = SparseLinear.from_dense(sparse_weight(40, 96, 0.5).to(dtype))
    probes = module.probe_tokens()
    paths = [module.path(tokens) for tokens in probes]
    assert len(set(paths)) == len(paths)
    if panels and dtype is torch.bfloat16:
        assert set(paths) == {sparse_linear.SPARSE_KERNEL, PANEL_KERNELS[panels][3], sparse_linear.EXPAND}
    else:
        assert probes == (SPARSE_TOKENS, sparse_linear.AVX512_SPARSE_TOKENS + 1)


@EACH_PANEL_KERNEL
def test_a_bfloat16_sparse_linear_on_a_panel_kernel_matches_linear(monkeypatch, panels):
    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE, raising=False)
    for _, _, variable, _ in PANEL_KERNELS.values():
        monkeypatch.delenv(variable, raising=False)
    if panels == "avx512_bf16":
        monkeypatch.setenv(cpu_kernels.AMX_VARIABLE, "0")  # AMX, where the CPU has it, would come first
    cpu_kernels.reset_isa()
    linear = torch.nn.Linear(200, 150).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(sparse_weight(150, 200, 0.5, seed=8))
    module = SparseLinear.from_dense(linear.weight, linear.bias)
    for tokens in (1, 4, 40, 256, 300):
        x = torch.randn(2, tokens, 200).to(torch.bfloat16)
        with torch.no_grad():
            got, expected = module(x), linear(x)
        assert got.dtype is torch.bfloat16 and got.shape == expected.shape
        assert relative_error(got.double(), expected.double()) <= 1e-2  # bfloat16 outputs
    assert module.path(40) == PANEL_KERNELS[panels][3]
