"""The columns library (flashcli/engine/columns.py, issue 36): several columns through one
matrix, each with the bits of ggml's own product of that column alone (the reference: ggml's
mul_mat of one column, run here, not flashcli's code), for every weight type the engine runs, as
plain rows and, where ggml repacks the type on this CPU, in ggml's repacked layout; and the
fallback to one-column groups where the library is missing or its bits do not match."""

from __future__ import annotations

import numpy as np
import pytest

from flashcli.engine import columns, ggml, kernels
from flashcli.engine.kernels import ProbeTensor, encode_rows
from flashcli.engine.repack import RepackedWeights, repacks
from flashcli.engine.weight_types import SUPPORTED_TYPES

from conftest import verify_batch

TYPES = {name: ggml_type for ggml_type, name in SUPPORTED_TYPES.items()}
COUNTS = (1, 2, 3, 4, 5, 7, 8, 16, 33, 64)
D, ROWS = 512, 48  # two K-quant super-blocks; three groups of 16 interleaved rows
# the types of the models issue 36 is about (Qwen2.5 1.5B and Llama 3.1 8B at Q4_K_M): their
# path must exist wherever the library was built
REQUIRED = ("Q4_K", "Q6_K")


@pytest.fixture(scope="module")
def pool():
    p = ggml.ThreadPool(2)
    yield p
    p.close()


class Matrix:
    """A random matrix of a type, as plain rows or repacked by ggml (held open while used)."""

    def __init__(self, name: str, repacked: bool, seed: int = 0, rows: int = ROWS):
        self.ggml_type, self.rows = TYPES[name], rows
        rng = np.random.default_rng(seed)
        self.raw = encode_rows(rng.standard_normal((rows, D)).astype(np.float32), self.ggml_type)
        self.held = None
        if repacked:
            self.held = RepackedWeights()
            self.held.load({"w": ProbeTensor(self.ggml_type, D, rows, self.raw)})
            assert "w" in self.held.tensors, "repacks() said yes, the buffer said no"

    def tensor(self, g: ggml.Graph) -> ggml.TensorP:
        return self.held.tensors["w"] if self.held else g.external(self.raw, self.ggml_type, D, self.rows)

    def close(self):
        if self.held:
            self.held.close()


def run(pool, matrix: Matrix, x: np.ndarray, kernel=None) -> np.ndarray:
    """[n, rows]: matrix x for columns x [n, D], by `kernel` (None: ggml's mul_mat)."""
    g = ggml.Graph(pool, max_nodes=8)
    w = matrix.tensor(g)
    x_t, x_in = g.input(D, len(x))
    x_in[...] = x
    y = g.output(kernel(g, w, x_t) if kernel else g.L.mul_mat(g.ctx, w, x_t))
    g.finish()
    g.compute()
    out = g.array(y).copy()
    g.close()
    return out


def itself(kernel: columns.ColumnKernel):
    """The kernel's own path even for one column (its __call__ leaves a lone column to ggml)."""
    return lambda g, w, x_t: kernel.product(g, w, kernel.quantize(g, x_t))


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def test_the_library_was_built():
    assert columns.library() is not None, f"{columns.LIBRARY} is missing or stale: run `make setup`"


@pytest.mark.parametrize("layout", ["plain", "repacked"])
@pytest.mark.parametrize("name", sorted(TYPES))
def test_every_column_has_the_bits_it_gets_alone(name, layout, pool):
    repacked = layout == "repacked"
    if repacked and not repacks(TYPES[name], (D, ROWS)):
        pytest.skip(f"ggml does not repack {name} on this CPU")
    matrix = Matrix(name, repacked)
    try:
        g = ggml.Graph(pool, max_nodes=4)
        w = matrix.tensor(g)
        shape, checked = columns.layout(w), kernels.exact_columns(w)
        g.close()
        if checked is None:
            assert columns.library() is None or name not in REQUIRED, f"no exact columns path for {name} {layout}"
            pytest.skip(f"{name} {layout}: the columns path does not give ggml's one-column bits here")
        x = np.random.default_rng(1).standard_normal((max(COUNTS), D)).astype(np.float32)
        alone = np.concatenate([run(pool, matrix, x[j : j + 1]) for j in range(len(x))])
        for tile_bytes in (columns.TILE_BYTES, 1):  # 1: a tile of one group of rows, many tiles
            # every kernel the check at load would let through (ours for Q4_K, then ggml's)
            for kernel in columns.kernels(matrix.ggml_type, shape, tile_bytes):
                if not kernels.columns_match(kernel, shape):
                    continue
                for n in COUNTS:
                    together = run(pool, matrix, x[:n], itself(kernel))
                    for j in range(n):
                        where = (name, layout, tile_bytes, kernel.spec.fused, n, j)
                        assert np.array_equal(bits(together[j]), bits(alone[j])), where
    finally:
        matrix.close()


# q6_K.c takes 4 rows a pass over the columns on AVX-512 (two to a vector, then the rest a pair at
# a time, an odd last row paired with itself), 4 on AVX2 (then one at a time), and 64 columns at a time;
# each of ggml's 2 threads runs its own share of the rows (45: 22 and 23, 46: 23 each, 50: 25 each)
Q6_K_ROWS = (1, 3, 45, 46, 50)
Q6_K_COUNTS = tuple(range(1, 66)) + (70,)
# q4_K_8x8.c: groups of 8 rows (1 a thread, 3 on one thread and 2 on the other), 32 columns at a time
Q4_K_GROUPS = (2, 5)
Q4_K_COUNTS = tuple(range(1, 34)) + (64, 65)


def our_kernels(name: str, shape) -> list[columns.ColumnKernel]:
    """Every kernel of ours this CPU runs for the type and layout (unchecked, so that wrong bits
    fail here rather than being refused at load); skips where there is none."""
    ours = [k for k in columns.kernels(TYPES[name], shape) if k.spec.fused]
    if not ours:
        lib = columns.library()
        runs = lib and (lib.fc_q6_K_kernels() if name == "Q6_K" else lib.fc_q4_K_8x8_kernels())
        assert not runs, f"the CPU runs a kernel of ours for {name}, and kernels() lists none"
        pytest.skip(f"the CPU runs no kernel of ours for {name} (or the library is not built)")
    return ours


def assert_alone_bits(pool, matrix: Matrix, counts, kernels_, seed: int):
    """Every output of every kernel, for every count of columns, against ggml's mul_mat of that
    column alone."""
    x = np.random.default_rng(seed).standard_normal((max(counts), D)).astype(np.float32)
    alone = np.concatenate([run(pool, matrix, x[j : j + 1]) for j in range(len(x))])
    for kernel in kernels_:
        for n in counts:
            together = run(pool, matrix, x[:n], itself(kernel))
            assert together.shape == (n, matrix.rows)
            for j in range(n):
                assert np.array_equal(bits(together[j]), bits(alone[j])), (kernel.spec.fused, matrix.rows, n, j)


@pytest.mark.parametrize("rows", Q6_K_ROWS)
def test_our_q6_K_kernels_give_every_row_and_column_its_bits_alone(rows, pool):
    """Our plain Q6_K kernels (each the CPU runs), for rows that do not fill their passes and
    1-65 and 70 columns (65, 70: past one set of 64)."""
    kernels_ = our_kernels("Q6_K", None)
    matrix = Matrix("Q6_K", False, seed=rows, rows=rows)
    try:
        assert_alone_bits(pool, matrix, Q6_K_COUNTS, kernels_, seed=rows)
    finally:
        matrix.close()


@pytest.mark.parametrize("groups", Q4_K_GROUPS)
def test_our_q4_K_kernels_give_every_row_and_column_its_bits_alone(groups, pool):
    """Our kernels for ggml's 8x8 repacked Q4_K (each the CPU runs), for 1-33, 64 and 65
    columns (33, 65: past a set of 32)."""
    if not repacks(TYPES["Q4_K"], (D, 8 * groups)):
        pytest.skip("ggml does not repack Q4_K on this CPU")
    matrix = Matrix("Q4_K", True, seed=groups, rows=8 * groups)
    try:
        g = ggml.Graph(pool, max_nodes=4)
        shape = columns.layout(matrix.tensor(g))
        g.close()
        assert_alone_bits(pool, matrix, Q4_K_COUNTS, our_kernels("Q4_K", shape), seed=groups)
    finally:
        matrix.close()


@pytest.mark.parametrize("name, layout", [("Q4_K", "repacked"), ("Q6_K", "plain")])
def test_our_kernels_are_used_where_the_cpu_runs_them(name, layout, pool):
    """Where the CPU runs q4_K_8x8.c (ggml's 8x8 repacked Q4_K) or q6_K.c (plain Q6_K), products
    run on it (its bits checked equal to ggml's one-column kernel's), not column by column on
    ggml's."""
    repacked = layout == "repacked"
    if columns.library() is None or (repacked and not repacks(TYPES[name], (D, ROWS))):
        pytest.skip(f"no library, or no repacked {name}, here")
    matrix = Matrix(name, repacked)
    g = ggml.Graph(pool, max_nodes=4)
    shape = columns.layout(matrix.tensor(g))
    g.close()
    ours = columns.kernel(TYPES[name], shape, fused=True)
    chosen = kernels._checked_kernel(TYPES[name], shape)
    matrix.close()
    if ours is None:
        pytest.skip(f"the CPU does not run our {name} kernel, or ggml lays {name} out otherwise")
    assert chosen is not None and chosen.spec.fused == ours.spec.fused


def test_ggml_s_own_batch_differs_where_the_library_is_needed(pool):
    """The premise: 16 columns in one mul_mat do not all get their one-column bits on the
    repacked Q4_K (or plain Q6_K) kernels (ggml's gemm / tiled kernels), so the path is needed."""
    differs = []
    for name, repacked in (("Q4_K", True), ("Q6_K", False)):
        if repacked and not repacks(TYPES[name], (D, ROWS)):
            continue
        matrix = Matrix(name, repacked)
        x = np.random.default_rng(2).standard_normal((16, D)).astype(np.float32)
        alone = np.concatenate([run(pool, matrix, x[j : j + 1]) for j in range(16)])
        differs.append(not np.array_equal(bits(run(pool, matrix, x)), bits(alone)))
        matrix.close()
    assert any(differs)


def test_a_kernel_with_other_bits_fails_the_check():
    """The check at load refuses a kernel whose columns differ from ggml's one-column products:
    here Q5_K rows run through Q4_K's dot product (same block of 256 values, other bytes)."""
    if columns.library() is None:
        pytest.skip("the library is not built")
    good = columns.kernel(TYPES["Q5_K"], None)
    assert good is not None and kernels.columns_match(good, None)
    bad = columns.kernel(TYPES["Q5_K"], None)
    bad.spec.vec_dot = ggml.lib().get_type_traits_cpu(TYPES["Q4_K"]).contents.vec_dot
    assert not kernels.columns_match(bad, None)


@pytest.fixture
def without_library(monkeypatch, tmp_path):
    """columns.py as on a machine where the library did not build."""
    monkeypatch.setattr(columns, "LIBRARY", tmp_path / "libcolumns.so")
    columns.library.cache_clear()
    kernels._checked_kernel.cache_clear()
    yield
    monkeypatch.undo()
    columns.library.cache_clear()
    kernels._checked_kernel.cache_clear()


def test_without_the_library_there_is_no_columns_path(without_library, pool):
    matrix = Matrix("Q6_K", False)
    g = ggml.Graph(pool, max_nodes=4)
    assert columns.library() is None and kernels.exact_columns(matrix.tensor(g)) is None
    g.close()


def test_a_verifying_pass_has_single_token_bits_on_the_library(gemma3, monkeypatch):
    """Gemma 3 270M Q4_K_M: Q4_K (repacked where ggml repacks it), Q5_0, Q6_K and Q8_0 matrices,
    the verifying pass's products on the library's kernels."""
    if columns.library() is None:
        pytest.skip("the library is not built")
    calls = []
    original = columns.ColumnKernel.__call__
    monkeypatch.setattr(columns.ColumnKernel, "__call__", lambda self, *a: calls.append(self) or original(self, *a))
    batch, single = verify_batch(gemma3)
    assert calls, "no product of the verifying pass ran on the library"
    np.testing.assert_array_equal(batch, single)


def test_a_verifying_pass_has_single_token_bits_without_the_library(without_library, gemma3):
    batch, single = verify_batch(gemma3)
    np.testing.assert_array_equal(batch, single)


@pytest.mark.parametrize("sizes", [[3], [1, 2], [1, 3, 2, 1, 4], [2] * 9])
def test_columns_joined_in_pairs_are_numpy_s_concatenation(sizes, pool):
    """ggml.join_columns on parts [6, n_i] gives numpy's hstack of them, in order."""
    rng = np.random.default_rng(len(sizes))
    arrays = [rng.standard_normal((n, 6)).astype(np.float32) for n in sizes]  # [n_i, ne0]: ggml's [ne0, n_i]
    g = ggml.Graph(pool, max_nodes=64)
    parts = [g.external(a, ggml.F32, 6, len(a)) for a in arrays]
    out = g.output(g.L.scale(g.ctx, ggml.join_columns(g, parts), 1.0))
    g.finish()
    g.compute()
    np.testing.assert_array_equal(g.array(out).reshape(-1, 6), np.concatenate(arrays))
    g.close()
