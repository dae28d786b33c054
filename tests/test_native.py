"""The native kernels (fxprune/native): magnitude sums and cuts equal torch's, do not depend on the thread
count, refuse what they do not handle, and compile gives the same model with them, without them, and
where they cannot be built."""
import copy
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import fxprune
from fxprune import native

needs_kernels = pytest.mark.skipif(native.library() is None, reason="no C compiler here: the native kernels "
                                                                     "cannot be built (torch's ops serve)")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("shape, dims", [((64, 32), [0, 1]), ((300, 7), [0, 1]), ((24, 16, 3, 3), [0, 1]),
                                         ((5, 7), [0]), ((5, 7), [1]), ((9, 4, 2), [0]), ((1, 197, 48), [2]),
                                         ((3, 4, 5), [1]), ((2000, 40), [1])])
def test_magnitude_sums_equal_torchs(shape, dims, power, dtype):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=dtype)
    batch = native.MagnitudeSums(power)
    assert batch.add(torch.randn(3, 3), [0, 1])          # a second tensor in the same call
    assert batch.add(weight, dims)
    got = batch.run()[1]
    assert set(got) == set(dims)
    for dim in dims:
        want = (weight.double().abs() ** power).sum([d for d in range(weight.ndim) if d != dim])
        assert got[dim].dtype == torch.float64 and got[dim].shape == (shape[dim],)
        torch.testing.assert_close(got[dim], want, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)


@needs_kernels
def test_magnitude_sums_with_capped_blocks(monkeypatch):
    # a tall weight's blocks grow so that their column sums stay few (an LLM embedding); same sums
    torch.manual_seed(0)
    weight = torch.randn(1000, 300)
    monkeypatch.setattr(native, "MAX_SUM_BLOCKS", 3)
    batch = native.MagnitudeSums(1)
    batch.add(weight, [0, 1])
    assert batch.jobs[0].block_rows == 334
    got = batch.run()[0]
    torch.testing.assert_close(got[1], weight.double().abs().sum(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(got[0], weight.double().abs().sum(1), rtol=1e-5, atol=0)


@needs_kernels
def test_magnitude_sums_do_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    weights = [torch.randn(3072, 768), torch.randn(512, 256, 3, 3), torch.randn(1000, 37)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            batch = native.MagnitudeSums(1)
            for w in weights:
                batch.add(w, [0, 1])
            results.append(batch.run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert all(torch.equal(a[d], b[d]) for d in a)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.bool, torch.complex64])
@pytest.mark.parametrize("shape", [(64, 32), (10, 20, 3, 3), (7, 9, 2), (300, 5)])
def test_cuts_equal_index_select(shape, dtype):
    torch.manual_seed(0)
    tensor = (torch.randn(shape) * 10).to(dtype)
    rows = torch.sort(torch.randperm(shape[0])[: max(1, shape[0] // 2)]).values
    cols = torch.randperm(shape[1])[: max(1, shape[1] * 2 // 3)]          # any order, as index_select takes
    cuts = native.Cuts()
    both, columns = cuts.add(tensor, rows, cols), cuts.add(tensor, None, cols)
    assert cuts.run()
    assert torch.equal(both, tensor.index_select(0, rows).index_select(1, cols))
    assert torch.equal(columns, tensor.index_select(1, cols))
    assert both.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()


def test_kernels_decline_what_they_do_not_handle():
    matrix = torch.randn(6, 4)
    assert native.summed_view(matrix.t(), [0, 1], 1) is None                   # not contiguous
    assert native.summed_view(matrix.int(), [0, 1], 1) is None                 # a dtype they do not sum
    assert native.summed_view(torch.randn(2, 3, 4), [1, 2], 1) is None         # two dims but not rows and columns
    assert native.summed_view(matrix, [0, 1], 3) is None
    cuts = native.Cuts()
    assert cuts.add(matrix.t(), None, torch.tensor([0])) is None
    complex_matrix = torch.randn(6, 4, dtype=torch.complex64)
    assert cuts.add(complex_matrix.conj(), None, torch.tensor([0])) is None      # a lazy conjugate bit
    assert cuts.add(torch.quantize_per_tensor(matrix, 0.1, 0, torch.qint8), None, torch.tensor([0])) is None
    assert cuts.add(matrix.to_sparse(), None, torch.tensor([0])) is None
    assert cuts.add(matrix, torch.tensor([6]), torch.tensor([0])) is None         # out of range: never read
    assert cuts.add(matrix, None, torch.tensor([-1])) is None
    assert cuts.jobs == []


def _compile_pair(model, x, monkeypatch, **kwargs):
    """compile with the kernels, then without: (pruned, pruned)."""
    with_kernels = fxprune.compile(model, 0.5, example_inputs=(x,), **kwargs)
    monkeypatch.setenv(native.ENV, "0")
    without = fxprune.compile(model, 0.5, example_inputs=(x,), **kwargs)
    monkeypatch.delenv(native.ENV)
    return with_kernels, without


def _assert_same_model(a, b):
    assert a.meta["fxprune"]["modules"] == b.meta["fxprune"]["modules"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@needs_kernels
@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_compile_gives_the_same_model_with_and_without_the_kernels(monkeypatch, importance):
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128).eval()
    cases = [(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)), (vit, torch.randn(1, 3, 32, 32)),
             (copy.deepcopy(vit).to(torch.bfloat16), torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))]
    for model, x in cases:
        with_kernels, without = _compile_pair(model, x, monkeypatch, importance=importance)
        _assert_same_model(with_kernels, without)
        assert with_kernels.meta["fxprune"]["flops"]["ratio"] < 0.6


def test_a_failed_build_falls_back_to_torchs_ops(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.INFO, logger="fxprune"):
        assert native.library() is None
    assert "native kernels unavailable" in caplog.text and "no-such-compiler" in caplog.text
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    fallback = fxprune.compile(model, 0.5, example_inputs=(x,))
    assert not native.MagnitudeSums(1).add(torch.randn(4, 4), [0, 1])
    assert native.Cuts().add(torch.randn(4, 4), None, torch.tensor([0, 2])) is None
    monkeypatch.setenv("FXPRUNE_NATIVE", "0")
    _assert_same_model(fallback, fxprune.compile(model, 0.5, example_inputs=(x,)))


@needs_kernels
def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path))
    lib = native.library()
    built = list((tmp_path / "native").iterdir())
    assert lib is not None and len(built) == 1     # no partial files left behind
    assert native.library() is lib
    np.testing.assert_equal(native.MagnitudeSums(1).run(), [])


@needs_kernels
def test_the_built_library_passes_its_self_test_in_a_child_process():
    path = native._library_path()
    assert subprocess.run([sys.executable, native.SELF_TEST, path]).returncode == 0


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler here")
def test_the_kernels_build_and_pass_their_self_test_where_there_is_a_compiler(monkeypatch, tmp_path):
    # the other tests skip without the kernels: a library refused by its self-test must fail here
    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path))
    assert native.library() is not None


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_a_library_that_computes_wrongly_is_never_cached(monkeypatch, tmp_path, caplog):
    source = pathlib.Path(native.SOURCE).read_text()
    assert "d[j] = s[cols[j]];" in source
    wrong = tmp_path / "kernels.c"
    wrong.write_text(source.replace("d[j] = s[cols[j]];", "d[j] = s[j];"))   # cuts that ignore the columns
    monkeypatch.setattr(native, "SOURCE", str(wrong))
    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path / "cache"))
    native._build_key.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="fxprune"):
            assert native.library() is None
    finally:
        native._build_key.cache_clear()
    assert "self-test" in caplog.text and "cut" in caplog.text
    assert list((tmp_path / "cache" / "native").iterdir()) == []
