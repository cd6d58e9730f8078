"""The compiled CPU top-k against torch.topk: same values, indices that point at them."""
from __future__ import annotations

import pytest
import torch

from flashsae.kernels import cpu_topk


def _check(x: torch.Tensor, k: int) -> None:
    values, indices = cpu_topk.topk(x, k)
    expected = x.topk(k, dim=-1, sorted=False).values
    assert values.dtype == x.dtype and indices.dtype == torch.int64 and values.shape == (x.shape[0], k)
    # the same multiset of values per row (NaN sorts last in both)
    torch.testing.assert_close(values.float().sort(-1).values, expected.float().sort(-1).values, rtol=0, atol=0,
                               equal_nan=True)
    assert torch.equal(x.gather(1, indices).view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32),
                       values.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32))
    assert all(len(set(row)) == k for row in indices.tolist())  # distinct indices


def test_builds_here():
    # gcc is part of the supported set-up; a silent fallback here would hide a broken build
    assert cpu_topk.available() and cpu_topk.build() in ("avx512", "portable")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(7, 4096, 16), (33, 512, 16), (5, 333, 7), (3, 16, 1), (9, 300, 1),
                                      (4, 1000, 62), (6, 256 * 3 + 17, 48), (2, 100_003, 64),
                                      (5, 512, 64), (3, 1000, 125), (4, 512, 32)])
def test_matches_torch_topk(dtype, rows, n, k):
    g = torch.Generator().manual_seed(n * 31 + k)
    _check(torch.randn(rows, n, generator=g).to(dtype), k)


def test_ties_nan_and_inf():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (16, 700), generator=g).float()  # heavy ties
    _check(x, 20)
    x = torch.randn(16, 700, generator=g)
    x[0, 5] = float("nan")
    x[1, ::3] = float("nan")
    x[2] = float("-inf")
    x[3, 600:] = float("-inf")
    x[4, 10] = float("inf")
    x[5, :] = 1.0
    _check(x, 11)


def test_auxk_style_mask_with_few_finite_entries():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(64, 4096, generator=g)
    dead = torch.zeros(4096, dtype=torch.bool)
    dead[torch.randperm(4096, generator=g)[:40]] = True  # fewer eligible latents than k_aux
    _check(pre.masked_fill(~dead, float("-inf")), 128)


def test_strided_rows_and_threads():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(1024, 600, generator=g)
    view = base[:, 50:562]  # row stride 600, unit column stride
    assert not view.is_contiguous()
    for threads in (1, 2):
        with torch.inference_mode():
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                _check(view, 16)
            finally:
                torch.set_num_threads(old)


def test_gradient_flows_through_values():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 512, generator=g, requires_grad=True)
    values, indices = cpu_topk.topk(x, 4)
    values.sum().backward()
    expected = torch.zeros_like(x).scatter_(1, indices, 1.0)
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("case", ["large-k", "float64", "column-stride"])
def test_falls_back_to_torch_outside_its_range(case):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 64, generator=g)
    k = 3
    if case == "large-k":
        k = 40  # more than n / 16
    elif case == "float64":
        x = x.double()
    else:
        x = torch.randn(64, 6, generator=g).t()
    _check(x, k)


def test_without_a_compiler_uses_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FLASHSAE_CACHE", str(tmp_path / "cache"))
    cpu_topk._library.cache_clear()
    try:
        assert not cpu_topk.available()
        _check(torch.randn(10, 4096), 16)
        assert not any((tmp_path / "cache").rglob("*.so"))  # nothing half-built left behind
    finally:
        monkeypatch.undo()
        cpu_topk._library.cache_clear()
    assert cpu_topk.available()


def test_reference_setting_disables_it(monkeypatch):
    monkeypatch.setenv("FLASHSAE_KERNELS", "reference")
    assert not cpu_topk.available()
    _check(torch.randn(10, 4096), 16)


@pytest.mark.skipif(not cpu_topk.available(), reason="needs the compiler")
def test_the_portable_build_without_avx512(monkeypatch, tmp_path):
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the flag is x86 only; elsewhere the portable build is the only build")
    monkeypatch.setenv("FLASHSAE_CPU_TOPK_CFLAGS", "-mno-avx512f")
    monkeypatch.setenv("FLASHSAE_CACHE", str(tmp_path))
    cpu_topk._library.cache_clear()
    try:
        assert cpu_topk.build() == "portable"
        g = torch.Generator().manual_seed(5)
        for dtype in (torch.float32, torch.bfloat16):
            for rows, n, k in [(7, 4096, 16), (5, 333, 7), (4, 512, 64), (3, 300, 1)]:
                _check(torch.randn(rows, n, generator=g).to(dtype), k)
        x = torch.randn(8, 700, generator=g)
        x[0, 5] = float("nan")
        x[1] = float("-inf")
        _check(x, 11)
    finally:
        monkeypatch.undo()
        cpu_topk._library.cache_clear()
