"""Hostile input: malformed, truncated or tampered files give a FlashSAEError with a clear message
(or load correctly), never a raw traceback, and loading never executes code."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from flashsae import ArtifactError, DataError, FlashSAEError, io
from flashsae.codes import load_csr
from flashsae.data import open_source
from flashsae.models import build

SRC = Path(__file__).resolve().parents[1] / "src" / "flashsae"
FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
X = np.arange(12, dtype=np.float32).reshape(4, 3)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("valid")
    np.save(d / "a.npy", X)
    np.savez(d / "a.npz", a=X)
    (d / "a.csv").write_text("p,q,r\n" + "\n".join(",".join(f"{v:g}" for v in row) for row in X) + "\n")
    (d / "a.tsv").write_text("\n".join("\t".join(f"{v:g}" for v in row) for row in X) + "\n")
    save_file({"activations": X}, str(d / "a.safetensors"))
    return {p.suffix: p.read_bytes() for p in d.iterdir()}


def _mutations(data: bytes):
    """Truncations, byte flips, insertions and plain random bytes of a valid file."""
    n = len(data)
    truncate = st.integers(0, n).map(lambda i: data[:i])
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: bytes(_apply(bytearray(data), edits)))
    insert = st.tuples(st.integers(0, n), st.binary(max_size=32)).map(lambda t: data[:t[0]] + t[1] + data[t[0]:])
    return st.one_of(truncate, flips, insert, st.binary(max_size=256))


def _apply(buf: bytearray, edits) -> bytearray:
    for i, v in edits:
        buf[i] = v
    return buf


def _open_and_read(path: Path) -> None:
    """A Source that opens must also read: every row, in order and shuffled."""
    try:
        source = open_source(path)
    except FlashSAEError as e:
        assert str(e) and "Traceback" not in str(e)
        return
    assert source.read(0, source.n_rows).shape == (source.n_rows, source.d_in)
    assert source.take(np.arange(source.n_rows)[::-1]).shape == (source.n_rows, source.d_in)


@pytest.mark.parametrize("ext", [".npy", ".npz", ".csv", ".tsv", ".safetensors"])
def test_mangled_data_files_fail_cleanly(tmp_path, valid_files, ext):
    path = tmp_path / f"data{ext}"

    @FUZZ
    @given(_mutations(valid_files[ext]))
    def check(data):
        path.write_bytes(data)
        _open_and_read(path)

    check()


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=8)


@FUZZ
@given(st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]),
                       json_values | st.sampled_from(["F32", "BF16", "I8", "F8_E4M3"])
                       | st.lists(st.integers(-5, 2**64), max_size=3), max_size=3))
def test_safetensors_header_entries(tmp_path, entry):
    header = json.dumps({"activations": entry}).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    _open_and_read(path)


@FUZZ
@given(st.text(max_size=100) | st.builds(
    lambda descr, order, shape: repr({"descr": descr, "fortran_order": order, "shape": shape}),
    st.sampled_from(["<f4", "<f8", "|b1", "<c8", "O", "|V4", "<U3", "x"]), st.booleans() | st.integers(),
    st.tuples(st.integers(-3, 2**40), st.integers(-3, 2**40)) | st.tuples() | st.tuples(st.integers(0, 5))))
def test_npy_header_text(tmp_path, header):
    text = header.encode("latin1", "replace")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    path = tmp_path / "h.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + bytes(48))
    _open_and_read(path)


@pytest.mark.parametrize("content, message", [
    ("p,q\n", "no rows"),
    ("\n\n", "no rows"),
    ("1,2\n3\n", "found 1 cells, expected 2"),
    ("1,2\n3,x\n", "cannot read 'x' as a number"),
    ("1,2\n3,\x004\n", "line 2, column 2"),
])
def test_bad_csv_messages(tmp_path, content, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        open_source(path)


@pytest.mark.parametrize("array, message", [
    (np.zeros((5, 0), np.float32), "0 columns"),
    (np.zeros((0, 3), np.float32), "no rows"),
    (np.zeros(4, np.float32), "expected 2-D"),
    (np.zeros((2, 2, 2, 2), np.float32), "expected 2-D"),  # 3-D .npy files are images
    (np.zeros((2, 2), np.complex64), "complex"),
    (np.array([["a", "b"]]), "non-numeric"),
])
def test_wrong_shapes_and_dtypes(tmp_path, array, message):
    np.save(tmp_path / "a.npy", array)
    np.savez(tmp_path / "a.npz", a=array)
    for name in ("a.npy", "a.npz"):
        with pytest.raises(DataError, match=message):
            open_source(tmp_path / name)


def test_object_arrays_are_never_unpickled(tmp_path):
    np.save(tmp_path / "o.npy", np.array([[{"x": 1}]], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "o.npz", a=np.array([[{"x": 1}]], dtype=object))
    for name in ("o.npy", "o.npz"):
        with pytest.raises(DataError):
            open_source(tmp_path / name)


def test_manifest_cannot_list_files_outside_its_directory(tmp_path):
    (tmp_path / "shards").mkdir()
    np.save(tmp_path / "outside.npy", X)
    for entry in ("../outside.npy", str(tmp_path / "outside.npy"), 3, {"nofile": 1}):
        (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"shards": [entry]}))
        with pytest.raises(DataError, match="not a file name inside the directory"):
            open_source(tmp_path / "shards")


# ---- run directories -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run") / "run"
    d.mkdir()
    model = build("topk", d_in=4, d_sae=8, k=2)
    config = {"format_version": io.FORMAT_VERSION, "library": "flashsae", "architecture": "topk",
              "model": model.cfg.to_dict(), "preprocess": {"mode": "none"}}
    io.save_model(d, model, config)
    return d


def _copy_run(src: Path, dst: Path, config: dict | None = None, model_bytes: bytes | None = None) -> Path:
    dst.mkdir(exist_ok=True)
    (dst / io.CONFIG_FILE).write_text(json.dumps(config) if config is not None
                                      else (src / io.CONFIG_FILE).read_text())
    (dst / io.MODEL_FILE).write_bytes(model_bytes if model_bytes is not None else (src / io.MODEL_FILE).read_bytes())
    return dst


def _load_or_artifact_error(path: Path) -> None:
    try:
        io.load(path)
    except FlashSAEError as e:
        assert str(e)


def test_mangled_model_file_fails_cleanly(tmp_path, run_dir):
    good = (run_dir / io.MODEL_FILE).read_bytes()

    @FUZZ
    @given(_mutations(good))
    def check(data):
        _load_or_artifact_error(_copy_run(run_dir, tmp_path / "r", model_bytes=data))

    check()


def test_mangled_config_fails_cleanly(tmp_path, run_dir):
    config = json.loads((run_dir / io.CONFIG_FILE).read_text())
    keys = st.sampled_from(["architecture", "model", "preprocess", "format_version"])
    model_keys = st.sampled_from(["d_in", "d_sae", "k", "encoder_hidden", "normalize_decoder", "k_aux"])
    values = json_values | st.integers(-2**64, 2**64) | st.lists(st.integers(-2**40, 2**40), max_size=3)

    @FUZZ
    @given(st.one_of(st.tuples(st.just("top"), keys, values), st.tuples(st.just("model"), model_keys, values)))
    def check(change):
        where, key, value = change
        cfg = json.loads(json.dumps(config))
        (cfg if where == "top" else cfg["model"])[key] = value
        _load_or_artifact_error(_copy_run(run_dir, tmp_path / "r", config=cfg))

    check()


@pytest.mark.parametrize("model_change, message", [
    ({"d_sae": 10**12}, "d_sae = 1000000000000"),
    ({"d_in": 2**20, "d_sae": 2**20}, "more than flashsae loads"),
    ({"encoder_hidden": [2**31 + 1]}, "encoder_hidden"),
    ({"d_sae": 8.0}, "d_sae = 8.0"),
    ({"extra": 1}, "unknown model option 'extra'"),
])
def test_absurd_or_unknown_model_options_are_refused_before_allocating(tmp_path, run_dir, model_change, message):
    cfg = json.loads((run_dir / io.CONFIG_FILE).read_text())
    cfg["model"].update(model_change)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        io.load(_copy_run(run_dir, tmp_path / "r", config=cfg))


def test_unknown_config_key_is_named(tmp_path, run_dir):
    cfg = json.loads((run_dir / io.CONFIG_FILE).read_text())
    cfg["exec_me"] = "import os"
    with pytest.raises(ArtifactError, match="unknown key 'exec_me'"):
        io.load(_copy_run(run_dir, tmp_path / "r", config=cfg))


@pytest.mark.parametrize("name", [io.CONFIG_FILE, io.MODEL_FILE])
def test_symlinks_out_of_the_run_directory_are_refused(tmp_path, run_dir, name):
    run = _copy_run(run_dir, tmp_path / "r")
    outside = tmp_path / f"elsewhere-{name}"
    (run / name).rename(outside)
    (run / name).symlink_to(outside)
    with pytest.raises(ArtifactError, match="points outside its directory"):
        io.load(run)
    (run / name).unlink()
    (run / name).symlink_to(Path("..") / outside.name)
    with pytest.raises(ArtifactError, match="points outside its directory"):
        io.load(run)


def test_a_run_directory_reached_through_a_symlink_still_loads(tmp_path, run_dir):
    (tmp_path / "latest").symlink_to(run_dir)
    assert io.load(tmp_path / "latest").d_sae == 8


def test_cli_prints_one_line_for_a_corrupt_run(tmp_path, run_dir, capsys):
    from flashsae.cli import main

    run = _copy_run(run_dir, tmp_path / "r", model_bytes=b"\x00" * 7)
    assert main(["info", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashsae: error: ") and "Traceback" not in err and "model.safetensors" in err


# ---- sparse codes ------------------------------------------------------------------------------

def test_mangled_codes_fail_cleanly(tmp_path):
    valid = tmp_path / "valid.npz"
    sp.save_npz(valid, sp.random(5, 8, density=0.3, format="csr", dtype=np.float32, random_state=0),
                compressed=False)
    path = tmp_path / "codes.npz"

    @FUZZ
    @given(_mutations(valid.read_bytes()))
    def check(data):
        path.write_bytes(data)
        try:
            load_csr(path, 8)[0:3].toarray()
        except FlashSAEError:
            pass

    check()


@pytest.mark.parametrize("arrays, message", [
    ({"indices": np.array([0, 99], np.int32)}, "not a scipy sparse"),  # column 99 of 8: caught by check_format
    ({"data": np.array([1 + 1j, 2], np.complex64)}, "complex"),
    ({"format": np.array(b"lil")}, "not a scipy sparse"),
    ({"shape": np.array([2, 9])}, r"shape \(2, 9\) but the model has 8 latents"),
])
def test_tampered_codes(tmp_path, arrays, message):
    parts = {"format": np.array(b"csr"), "shape": np.array([2, 8]), "data": np.array([1.0, 2.0], np.float32),
             "indices": np.array([0, 5], np.int32), "indptr": np.array([0, 1, 2], np.int32), **arrays}
    np.savez(tmp_path / "c.npz", **parts)
    with pytest.raises(DataError, match=message):
        load_csr(tmp_path / "c.npz", 8)


# ---- no code execution while loading -------------------------------------------------------------

def test_loading_never_unpickles():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text, path
        assert "import pickle" not in text and "allow_pickle=True" not in text, path
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (path, call)
