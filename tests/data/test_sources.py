import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from flashsae.data import make_synthetic, open_source
from flashsae.data.builtin import sample_synthetic, synthetic_params
from flashsae.errors import ConfigError, DataError


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((37, 5)).astype(np.float32)


def check_source(src, expected):
    """read, take (shuffled, repeated) and dtype/layout agree with `expected`."""
    assert (src.n_rows, src.d_in) == expected.shape
    got = src.read(0, src.n_rows)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(src.read(3, 9), expected[3:9])
    n = src.n_rows
    rows = np.array([5, 0, 36, 5, 2, 1], dtype=np.int64) % n
    took = src.take(rows)
    assert took.dtype == np.float32 and took.shape == (6, src.d_in) and took.flags.writeable
    np.testing.assert_array_equal(took, expected[rows])
    run = np.arange(1, min(n, 7))
    took = src.take(run)  # one contiguous run: a slice, still copied
    assert took.flags.writeable and took.flags.c_contiguous
    np.testing.assert_array_equal(took, expected[run])
    assert src.take(np.zeros(0, np.int64)).shape == (0, src.d_in)


def test_in_memory_numpy_and_torch(x):
    check_source(open_source(x), x)
    check_source(open_source(x.astype(np.float64)), x)
    check_source(open_source(torch.from_numpy(x)), x)
    check_source(open_source(torch.from_numpy(x).bfloat16()), torch.from_numpy(x).bfloat16().float().numpy())
    src = open_source(x)
    with pytest.raises(ValueError):
        src.read(0, 2)[0, 0] = 1.0  # views are read-only: the source cannot be edited through them
    with pytest.raises(IndexError):
        src.take(np.array([-1]))


def test_npy_is_memmapped_and_converted(tmp_path, x):
    np.save(tmp_path / "a.npy", x)
    src = open_source(tmp_path / "a.npy")
    assert isinstance(src._array, np.memmap)
    assert src.name == str(tmp_path / "a.npy")
    check_source(src, x)
    ints = (x * 10).astype(np.int16)
    np.save(tmp_path / "i.npy", ints)
    check_source(open_source(str(tmp_path / "i.npy")), ints.astype(np.float32))
    np.save(tmp_path / "f.npy", np.asfortranarray(x.astype(np.float16)))
    check_source(open_source(tmp_path / "f.npy"), x.astype(np.float16).astype(np.float32))


def test_npz_with_and_without_key(tmp_path, x):
    np.savez(tmp_path / "one.npz", data=x)
    check_source(open_source(tmp_path / "one.npz"), x)
    np.savez_compressed(tmp_path / "two.npz", a=x, b=x[:, :2] * 2)
    check_source(open_source(tmp_path / "two.npz", key="b"), x[:, :2] * 2)
    with pytest.raises(DataError, match=r"two\.npz holds several arrays \(a, b\); choose one with key"):
        open_source(tmp_path / "two.npz")
    with pytest.raises(DataError, match=r"two\.npz has no array named 'c'; available: a, b"):
        open_source(tmp_path / "two.npz", key="c")


def test_csv_with_and_without_header(tmp_path):
    expected = np.array([[1, 2.5, -3], [4e-3, 5, 6], [7, 8, 9]], dtype=np.float32)
    (tmp_path / "h.csv").write_text("a,b,c\n1,2.5,-3\n0.004, 5 ,6\n\n7,8,9\n\n")
    check_source(open_source(tmp_path / "h.csv"), expected)
    (tmp_path / "n.csv").write_text("1,2.5,-3\n0.004,5,6\n7,8,9\n")
    check_source(open_source(tmp_path / "n.csv"), expected)
    (tmp_path / "t.tsv").write_text("x\ty\tz\n1\t2.5\t-3\n0.004\t5\t6\n7\t8\t9\n")
    check_source(open_source(tmp_path / "t.tsv"), expected)
    (tmp_path / "nan.csv").write_text("1,nan\ninf,2\n")
    assert np.isnan(open_source(tmp_path / "nan.csv").read(0, 1)[0, 1])  # non-finite is data, not an error


def test_csv_bad_cells_name_line_and_column(tmp_path):
    (tmp_path / "h.csv").write_text("a,b,c\n1,2,3\n4,oops,6\n")
    with pytest.raises(DataError, match=r"h\.csv, line 3, column 'b': cannot read 'oops' as a number"):
        open_source(tmp_path / "h.csv")
    (tmp_path / "n.csv").write_text("1,2,3\n4,5,6\n7,8,x9\n")
    with pytest.raises(DataError, match=r"n\.csv, line 3, column 3: cannot read 'x9' as a number"):
        open_source(tmp_path / "n.csv")
    (tmp_path / "e.csv").write_text("a,b\n1,\n")
    with pytest.raises(DataError, match=r"e\.csv, line 2, column 'b': empty cell"):
        open_source(tmp_path / "e.csv")
    (tmp_path / "r.csv").write_text("1,2\n3,4,5\n")
    with pytest.raises(DataError, match=r"r\.csv, line 2: found 3 cells, expected 2"):
        open_source(tmp_path / "r.csv")
    (tmp_path / "only_header.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"only_header\.csv has no rows"):
        open_source(tmp_path / "only_header.csv")


def test_safetensors_f32_bf16_and_keys(tmp_path, x):
    save_numpy({"acts": x}, str(tmp_path / "one.safetensors"))
    check_source(open_source(tmp_path / "one.safetensors"), x)
    bf = torch.from_numpy(x).bfloat16()
    save_torch({"activations": bf, "tokens": torch.arange(37).reshape(37, 1)}, str(tmp_path / "bf.safetensors"))
    src = open_source(tmp_path / "bf.safetensors")  # "activations" is the default among several
    check_source(src, bf.float().numpy())
    check_source(open_source(tmp_path / "bf.safetensors", key="tokens"), np.arange(37, dtype=np.float32)[:, None])
    save_numpy({"a": x, "b": x}, str(tmp_path / "ab.safetensors"))
    with pytest.raises(DataError, match=r"ab\.safetensors holds several tensors \(a, b\)"):
        open_source(tmp_path / "ab.safetensors")
    with pytest.raises(DataError, match=r"has no tensor named 'z'; available: a, b"):
        open_source(tmp_path / "ab.safetensors", key="z")
    save_torch({"f8": torch.zeros(2, 2).to(torch.float8_e4m3fn)}, str(tmp_path / "f8.safetensors"))
    with pytest.raises(DataError, match=r"f8\.safetensors: tensor 'f8' has unsupported dtype F8_E4M3; supported: F64"):
        open_source(tmp_path / "f8.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(DataError, match=r"junk\.safetensors is not a valid \.safetensors file"):
        open_source(tmp_path / "junk.safetensors")


def test_shard_directory(tmp_path, x):
    d = tmp_path / "shards"
    d.mkdir()
    np.save(d / "00.npy", x[:10])
    save_torch({"activations": torch.from_numpy(x[10:30])}, str(d / "01.safetensors"))
    np.save(d / "02.npy", x[30:].astype(np.float64))
    (d / "manifest.json").write_text(json.dumps({"image_shape": [1, 5], "other": 1}))
    (d / "notes.txt").write_text("ignored")
    src = open_source(d)
    check_source(src, x)
    assert src.image_shape == (1, 5)
    rows = np.random.default_rng(1).permutation(37)
    np.testing.assert_array_equal(src.take(rows), x[rows])
    np.testing.assert_array_equal(src.read(8, 33), x[8:33])  # spans all three shards
    np.save(d / "03.npy", x[:, :4])
    with pytest.raises(DataError,
                       match=r"03\.npy has 4 columns but .*00\.npy has 5; all shards must have the same width"):
        open_source(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="is a directory with no .npy or .safetensors shards"):
        open_source(empty)


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.npy: no such file"):
        open_source(tmp_path / "missing.npy")
    with pytest.raises(DataError, match=r"no such file or directory \(built-in data sets: digits, synthetic\)"):
        open_source("digts")
    (tmp_path / "a.parquet").write_text("x")
    with pytest.raises(DataError,
                       match=r"a\.parquet: unsupported file type '\.parquet'; supported: \.npy, \.npz, \.csv"):
        open_source(tmp_path / "a.parquet")
    for name in ("e.csv", "e.npy", "e.safetensors"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DataError, match=rf"e\.{name[2:]} is empty"):
            open_source(tmp_path / name)
    (tmp_path / "bad.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(DataError, match=r"bad\.npy is not a valid \.npy file"):
        open_source(tmp_path / "bad.npy")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad\.npz is not a valid \.npz file"):
        open_source(tmp_path / "bad.npz")
    np.save(tmp_path / "cut.npy", np.zeros((100, 10), np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:2000])
    with pytest.raises(DataError, match=r"cut\.npy is truncated"):
        open_source(tmp_path / "cut.npy")


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros(5, np.float32), r"has shape \(5,\); expected 2-D data \(rows, features\)"),
        (np.zeros((2, 3, 4, 5), np.float32), r"has shape \(2, 3, 4, 5\); expected 2-D data \(rows, features\)"),
        (np.zeros((0, 3), np.float32), r"has no rows"),
        (np.zeros((3, 0), np.float32), r"has 0 columns"),
        (np.array([["a", "b"]]), r"holds non-numeric data of dtype <U1"),
        (np.zeros((2, 2), np.complex64), r"holds complex data of dtype complex64"),
    ],
)
def test_shape_and_dtype_errors(tmp_path, array, message):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(DataError, match=r"a\.npy " + message):
        open_source(tmp_path / "a.npy")
    with pytest.raises(DataError, match="array " + message):
        open_source(array)
    if array.dtype.kind == "f":
        save_numpy({"t": array}, str(tmp_path / "a.safetensors"))
        with pytest.raises(DataError, match=r"a\.safetensors\['t'\] " + message):
            open_source(tmp_path / "a.safetensors")


def test_object_arrays_are_rejected(tmp_path):
    obj = np.array([[1, "a"]], dtype=object)
    np.save(tmp_path / "o.npy", obj, allow_pickle=True)
    with pytest.raises(DataError, match=r"o\.npy holds non-numeric data of dtype object"):
        open_source(tmp_path / "o.npy")
    np.savez(tmp_path / "o.npz", a=obj)
    with pytest.raises(DataError, match=r"o\.npz: array 'a' holds non-numeric data"):
        open_source(tmp_path / "o.npz")
    with pytest.raises(DataError, match="array holds non-numeric data of dtype object"):
        open_source(obj)


def test_option_errors(tmp_path, x):
    np.save(tmp_path / "a.npy", x)
    with pytest.raises(ConfigError, match="key='k' was given but .*a.npy has no named arrays"):
        open_source(tmp_path / "a.npy", key="k")
    with pytest.raises(ConfigError, match=r"image_shape \(2, 2\) does not fit rows of 5 values"):
        open_source(x, image_shape=(2, 2))
    assert open_source(x, image_shape=[5, 1]).image_shape == (5, 1)
    with pytest.raises(ConfigError, match="synthetic options apply only to data='synthetic'"):
        open_source("digits", synthetic={"rows": 3})
    with pytest.raises(ConfigError, match="unknown synthetic option.* size; choose from: rows, d"):
        open_source("synthetic", synthetic={"size": 3})
    with pytest.raises(ConfigError, match=r"synthetic active \(9\) must not exceed atoms \(8\)"):
        synthetic_params({"active": 9, "atoms": 8})


def test_digits():
    src = open_source("digits")
    assert (src.n_rows, src.d_in, src.image_shape) == (1797, 64, (8, 8))
    x = src.read(0, src.n_rows)
    assert x.dtype == np.float32 and x.min() == 0 and x.max() == 16


def test_synthetic_rows_are_sparse_combinations_of_unit_atoms():
    params = {"rows": 500, "d": 16, "atoms": 40, "active": 3, "noise": 0.01, "seed": 3}
    src = open_source("synthetic", synthetic=params)
    assert (src.n_rows, src.d_in) == (500, 16)
    np.testing.assert_allclose(np.linalg.norm(src.ground_truth, axis=1), 1.0, rtol=1e-6)
    x, atoms, idx, coefs = sample_synthetic(**params)
    np.testing.assert_array_equal(src.read(0, 500), x)
    np.testing.assert_array_equal(src.ground_truth, atoms)
    assert x.dtype == atoms.dtype == np.float32
    assert all(len(set(row)) == 3 for row in idx.tolist())  # distinct atoms per row
    assert coefs.min() >= 0.5 and coefs.max() <= 2.0
    clean = np.einsum("ra,rad->rd", coefs, atoms[idx])
    residual = x - clean
    assert abs(residual.std() - 0.01) < 0.002  # exactly the added noise
    counts = np.bincount(idx.ravel(), minlength=40)
    assert counts.min() > 0  # every atom used: choices are spread over the dictionary
    same = make_synthetic(**params)
    np.testing.assert_array_equal(same[0], x)
    assert not np.array_equal(make_synthetic(**{**params, "seed": 4})[0], x)


def test_distinct_choices_are_uniform_subsets():
    from flashsae.data.builtin import _distinct_choices

    picks = _distinct_choices(np.random.default_rng(0), 20_000, 5, 4)
    assert (np.sort(picks, axis=1)[:, 1:] != np.sort(picks, axis=1)[:, :-1]).all()
    # 5 possible 4-subsets, each missing one element: each should be missed ~20% of the time
    missing = 10 - picks.sum(axis=1)
    freq = np.bincount(missing, minlength=5) / 20_000
    np.testing.assert_allclose(freq, 0.2, atol=0.015)
