"""flashsae encode streams its CSR output to disk: same codes as in memory, scipy-loadable, bounded memory."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from flashsae.codes import encode_to_csr, encode_to_npz, load_csr
from flashsae.data import ArraySource
from flashsae.models import build


@pytest.mark.parametrize("arch, opts", [("topk", {"k": 3}), ("relu-l1", {"l1": 0.1})])
def test_streamed_npz_equals_in_memory_codes(tmp_path, arch, opts):
    x = np.random.default_rng(0).normal(size=(1000, 6)).astype(np.float32)
    source = ArraySource(x, "array")
    model = build(arch, d_in=6, d_sae=20, **opts)
    rows = np.arange(0, 1000, 3)
    info = encode_to_npz(model, source, rows, tmp_path / "codes.npz", chunk_rows=37)
    codes = sp.load_npz(tmp_path / "codes.npz")
    assert codes.format == "csr" and codes.shape == info.shape == (len(rows), 20) and codes.nnz == info.nnz
    assert codes.has_sorted_indices and codes.indices.dtype == codes.indptr.dtype == np.int32
    # Chunks of other sizes may round the encoder product differently in the last bit.
    np.testing.assert_allclose(codes.toarray(), model.encode(x[rows]).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(codes.toarray(), encode_to_csr(model, source, rows, chunk_rows=64).toarray(),
                               rtol=1e-6, atol=1e-6)
    assert load_csr(tmp_path / "codes.npz", 20).shape == (len(rows), 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npz"]  # no temporary files left


def test_encoding_memory_does_not_grow_with_the_rows(tmp_path):
    x = np.random.default_rng(1).normal(size=(200_000, 8)).astype(np.float32)
    model = build("topk", d_in=8, d_sae=32, k=8)
    source = ArraySource(x, "array")
    csr_bytes = 200_000 * 8 * (4 + 4)  # data + indices of the whole output: 12.8 MB
    tracemalloc.start()
    encode_to_npz(model, source, path=tmp_path / "codes.npz", chunk_rows=4096)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3 * 2**20 < csr_bytes / 4, peak  # one chunk of codes and one 1 MiB copy piece
    assert sp.load_npz(tmp_path / "codes.npz").nnz <= 200_000 * 8


def test_decoding_maps_the_file_flashsae_wrote(tmp_path, monkeypatch):
    from flashsae import DataError
    from flashsae import codes as codes_mod

    x = np.random.default_rng(2).normal(size=(3000, 6)).astype(np.float32)
    model = build("topk", d_in=6, d_sae=24, k=3)
    encode_to_npz(model, ArraySource(x, "array"), path=tmp_path / "codes.npz", chunk_rows=500)
    in_memory = sp.load_npz(tmp_path / "codes.npz").tocsr()
    codes_mod.decode_to_npy(model, in_memory, tmp_path / "ref.npy", chunk_rows=256)

    monkeypatch.setattr(sp, "load_npz", lambda *a, **k: pytest.fail("the whole file was loaded"))
    mapped = codes_mod.open_codes(tmp_path / "codes.npz", 24)
    assert isinstance(mapped, codes_mod.MappedCSR) and mapped.shape == (3000, 24)
    codes_mod.decode_to_npy(model, mapped, tmp_path / "out.npy", chunk_rows=256)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.load(tmp_path / "ref.npy"))
    with pytest.raises(DataError, match="has shape \\(3000, 24\\) but the model has 30 latents"):
        codes_mod.open_codes(tmp_path / "codes.npz", 30)
    monkeypatch.undo()

    # a compressed .npz (scipy's default) is loaded whole instead, with the same result
    sp.save_npz(tmp_path / "zipped.npz", in_memory, compressed=True)
    loaded = codes_mod.open_codes(tmp_path / "zipped.npz", 24)
    assert isinstance(loaded, sp.csr_matrix)
    codes_mod.decode_to_npy(model, loaded, tmp_path / "out2.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "out2.npy"), np.load(tmp_path / "ref.npy"))

    # a column index out of range is found in the slice that holds it, and nothing is written
    bad = in_memory.copy()
    bad.indices = bad.indices.copy()
    bad.indices[bad.indptr[2000]] = 99
    codes_mod._write_npz(tmp_path / "bad.npz", {"indices": bad.indices, "indptr": bad.indptr,
                                                "format": np.array(b"csr"), "data": bad.data,
                                                "shape": np.array(bad.shape, dtype=np.int64)})
    mapped = codes_mod.open_codes(tmp_path / "bad.npz", 24)
    assert isinstance(mapped, codes_mod.MappedCSR)
    with pytest.raises(DataError, match=r"column index is outside \[0, 24\) in rows 1792-2048"):
        codes_mod.decode_to_npy(model, mapped, tmp_path / "bad.npy", chunk_rows=256)
    assert not (tmp_path / "bad.npy").exists() and not list(tmp_path.glob(".bad*"))
