"""The command line end to end, and every user error: one line on stderr, exit code 2, nothing written."""
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from flashsae.cli import main

FAST = ["--latents", "32", "--k", "3", "--rows", "4096", "--batch-size", "128", "--quiet", "--threads", "1"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def npy_file(tmp_path_factory):
    from flashsae.data import make_synthetic

    X, _ = make_synthetic(rows=3000, d=16, atoms=24, active=2, noise=0.01, seed=3)
    path = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(path, X)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, npy_file):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", str(npy_file), "--out", str(out), *FAST]) == 0
    return out


def test_train_evaluate_encode_decode_info(trained, npy_file, tmp_path, capsys):
    code, out, _ = run_cli(["evaluate", trained, npy_file, "--json"], capsys)
    assert code == 0 and json.loads(out)["rows"] == 300  # the training data: its held-out rows
    code, out, _ = run_cli(["evaluate", trained, npy_file, "--rows", "all", "--json"], capsys)
    assert code == 0
    metrics = json.loads(out)
    assert metrics["rows"] == 3000 and metrics["fvu"] < 0.9 and metrics["l0"] <= 3
    assert (trained / "evaluation.json").exists()

    codes_path = tmp_path / "codes.npz"
    code, _, _ = run_cli(["encode", trained, npy_file, "--out", codes_path, "--quiet"], capsys)
    assert code == 0
    codes = sp.load_npz(codes_path)
    assert codes.shape == (3000, 32) and codes.getnnz(axis=1).max() <= 3

    recon = tmp_path / "x_hat.npy"
    code, _, _ = run_cli(["decode", trained, codes_path, "--out", recon, "--quiet"], capsys)
    assert code == 0
    X, X_hat = np.load(npy_file), np.load(recon)
    fvu = ((X - X_hat) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    assert abs(fvu - metrics["fvu"]) < 1e-3

    code, out, _ = run_cli(["info", trained], capsys)
    assert code == 0 and "topk sparse autoencoder" in out and "latents 32" in out and "fvu" in out


def test_module_entry_point_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flashsae", "train", "synthetic", "--synthetic-rows", "3000",
                           "--synthetic-d", "8", "--synthetic-atoms", "12", "--out", str(tmp_path / "s"), *FAST],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert "recovery" in metrics and 0 < metrics["recovery"] <= 1


def _expect_error(args, capsys, match, tmp_out=None):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("flashsae: error: "), err
    assert match in lines[0], lines[0]
    if tmp_out is not None:
        assert not tmp_out.exists() and not tmp_out.with_name(tmp_out.name + ".partial").exists()


def test_missing_file(tmp_path, capsys):
    _expect_error(["train", tmp_path / "nope.npy", "--out", tmp_path / "o", *FAST], capsys, "no such file",
                  tmp_path / "o")


def test_unknown_extension(tmp_path, capsys):
    f = tmp_path / "data.xyz"
    f.write_text("1,2\n")
    _expect_error(["train", f, "--out", tmp_path / "o", *FAST], capsys, "unsupported", tmp_path / "o")


def test_csv_with_non_numeric_cell(tmp_path, capsys):
    f = tmp_path / "t.csv"
    rows = ["a,b,c"] + [f"{i},{i * 2},{i % 3}" for i in range(300)]
    rows[42] = "41,oops,2"
    f.write_text("\n".join(rows) + "\n")
    code, _, err = run_cli(["train", f, "--out", tmp_path / "o", *FAST], capsys)
    assert code == 2 and "line 43" in err and "'b'" in err and "oops" in err


def test_nan_rows_are_counted_and_can_be_dropped(tmp_path, capsys, npy_file):
    X = np.load(npy_file)
    X[[5, 17, 99]] = np.nan
    X[200, 3] = np.inf
    f = tmp_path / "nan.npy"
    np.save(f, X)
    _expect_error(["train", f, "--out", tmp_path / "o", *FAST], capsys, "4 of 3000 rows contain NaN or Inf",
                  tmp_path / "o")
    code, _, _ = run_cli(["train", f, "--out", tmp_path / "o", "--drop-nonfinite", *FAST], capsys)
    assert code == 0
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["data_stats"]["nonfinite_dropped"] == 4


def test_empty_file(tmp_path, capsys):
    f = tmp_path / "e.csv"
    f.write_text("")
    _expect_error(["train", f, "--out", tmp_path / "o", *FAST], capsys, "empty", tmp_path / "o")


def test_fewer_rows_than_one_batch(tmp_path, capsys):
    f = tmp_path / "few.npy"
    np.save(f, np.random.rand(50, 4).astype(np.float32))
    _expect_error(["train", f, "--out", tmp_path / "o", *FAST], capsys, "fewer than one batch of 128",
                  tmp_path / "o")


def test_k_larger_than_latents(tmp_path, capsys, npy_file):
    _expect_error(["train", npy_file, "--out", tmp_path / "o", *FAST, "--k", "64"], capsys,
                  "k (64) must not exceed the number of latents (32)", tmp_path / "o")


@pytest.mark.parametrize("flag,value,message", [("--latents", "-5", "--latents must be >= 1, got -5"),
                                                ("--batch-size", "-3", "--batch-size must be >= 1, got -3"),
                                                ("--rows", "0", "--rows must be >= 1, got 0"),
                                                ("--lr", "-1", "--lr must be > 0, got -1.0"),
                                                ("--lr-warmup", "2", "--lr-warmup must be in [0, 1], got 2.0")])
def test_non_positive_sizes_name_the_flag(tmp_path, capsys, npy_file, flag, value, message):
    code, _, err = run_cli(["train", npy_file, "--out", tmp_path / "o", *FAST, flag, value], capsys)
    assert code == 2 and err == f"flashsae: error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_option_of_another_architecture(tmp_path, capsys, npy_file):
    _expect_error(["train", npy_file, "--out", tmp_path / "o", "--arch", "relu-l1", "--k", "4"], capsys,
                  "option --k applies to batchtopk, batchtopk-transcoder, clt, matryoshka, topk, topk-crosscoder, "
                  "transcoder, not to architecture 'relu-l1'", tmp_path / "o")


def test_config_field_names_become_flags():
    from flashsae.cli import build_parser, subcommand_parser
    from flashsae.cli.common import with_flag_names

    train = subcommand_parser(build_parser(), "train")
    assert with_flag_names("k (64) must not exceed the number of latents (32)", train) == \
        "--k (64) must not exceed the number of latents (32)"
    assert with_flag_names("synthetic_active must not exceed synthetic_atoms", train) == \
        "--synthetic-active must not exceed --synthetic-atoms"
    assert with_flag_names("batch_size 100 is not a multiple of the 3 ranks", train) == \
        "--batch-size 100 is not a multiple of the 3 ranks"
    # a one-word field is renamed only as the subject of a check; paths are left alone
    assert with_flag_names("4 of 3000 rows contain NaN in /data/d_sae/x.npy", train) == \
        "4 of 3000 rows contain NaN in /data/d_sae/x.npy"


def test_existing_output_without_overwrite(trained, npy_file, capsys):
    before = (trained / "model.safetensors").read_bytes()
    _expect_error(["train", npy_file, "--out", trained, *FAST], capsys, "already exists; pass --overwrite")
    assert (trained / "model.safetensors").read_bytes() == before


def test_width_mismatch_at_encode(trained, tmp_path, capsys):
    f = tmp_path / "narrow.npy"
    np.save(f, np.zeros((10, 5), np.float32))
    _expect_error(["encode", trained, f, "--out", tmp_path / "c.npz"], capsys,
                  "has 5 columns but the model expects 16")
    assert not (tmp_path / "c.npz").exists()


def test_run_dir_problems(trained, tmp_path, capsys, npy_file):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "config.json").write_text("{")
    _expect_error(["evaluate", broken, npy_file], capsys, "config.json is corrupt")
    (broken / "config.json").unlink()
    _expect_error(["info", broken], capsys, "config.json is missing")
    shutil.copytree(trained, tmp_path / "future")
    cfg = json.loads((tmp_path / "future" / "config.json").read_text())
    cfg["format_version"] = 7
    (tmp_path / "future" / "config.json").write_text(json.dumps(cfg))
    _expect_error(["info", tmp_path / "future"], capsys, "format_version 7")


def test_info_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    code, _, err = run_cli(["info", tmp_path / "plain"], capsys)
    assert code == 2 and err == (f"flashsae: error: {tmp_path / 'plain'} is not a flashsae run directory (no "
                                 "config.json); flashsae train and flashsae import write one\n")


def test_info_on_an_imported_model_prints_only_what_is_known(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "saelens"
    src.mkdir()
    W_dec = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    save_file({"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(32), "W_dec": W_dec, "b_dec": torch.zeros(8)},
              str(src / "sae_weights.safetensors"))
    (src / "cfg.json").write_text(json.dumps({"d_in": 8, "d_sae": 32, "architecture": "topk", "k": 4,
                                              "metadata": {"hook_name": "blocks.6.hook_resid_post"}}))
    run = tmp_path / "imported"
    assert run_cli(["import", src, "--out", run, "--quiet"], capsys)[0] == 0
    code, out, _ = run_cli(["info", run], capsys)
    assert code == 0 and "None" not in out
    from flashsae import __version__

    assert out.splitlines() == [
        f"{run}: topk sparse autoencoder, imported by flashsae {__version__}",
        "  sizes        d_in 8, latents 32, 552 parameters",
        "  options      --normalize-decoder, --k 4, --auxk-coef 0.03125, --auxk-budget 1",
        f"  imported     from SAELens (architecture topk), {src.resolve()}; trained on hook blocks.6.hook_resid_post",
        "  standardise  none (encodes raw rows, as the source library did)"]


def test_decode_of_dense_arrays(trained, tmp_path, capsys):
    np.savez(tmp_path / "dense.npz", codes=np.zeros((4, 32), np.float32))
    code, _, err = run_cli(["decode", trained, tmp_path / "dense.npz", "--out", tmp_path / "x.npy"], capsys)
    assert code == 2 and err == (f"flashsae: error: {tmp_path / 'dense.npz'} holds dense arrays (codes), not sparse "
                                 "codes; flashsae decode reads the sparse codes flashsae encode writes "
                                 "(scipy.sparse.save_npz)\n")
    np.save(tmp_path / "dense.npy", np.zeros((4, 32), np.float32))
    (tmp_path / "dense.npy").rename(tmp_path / "renamed.npz")
    code, _, err = run_cli(["decode", trained, tmp_path / "renamed.npz", "--out", tmp_path / "x.npy"], capsys)
    assert code == 2 and err == (f"flashsae: error: {tmp_path / 'renamed.npz'} is a dense .npy array, not sparse "
                                 "codes; flashsae decode reads the sparse codes flashsae encode writes "
                                 "(scipy.sparse.save_npz)\n")
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("argv, line", [
    (["train", "--k", "x", "--out", "o"],
     "flashsae train: error: argument --k: invalid int value: 'x' (see flashsae train --help)"),
    (["train", "--out", "x", "--no-such-flag"],
     "flashsae train: error: unrecognized arguments: --no-such-flag (see flashsae train --help)"),
    (["sweep", "digits", "--k", "2", "x", "--out", "o"],
     "flashsae sweep: error: argument --k: invalid int value: 'x' (see flashsae sweep --help)"),
    (["info"], "flashsae info: error: the following arguments are required: run_dir (see flashsae info --help)"),
    ([], "flashsae: error: the following arguments are required: COMMAND (see flashsae --help)"),
])
def test_bad_flags_print_one_line_and_exit_2(capsys, argv, line):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def test_top_level_help_lists_commands_and_examples_and_imports_no_torch():
    code = ("import sys, flashsae.cli; flashsae.cli.build_parser(); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "flashsae", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "torch" not in proc.stderr
    from flashsae.cli import SUBCOMMANDS

    for name in SUBCOMMANDS:
        assert f"\n    {name} " in proc.stdout, name
    assert "examples:\n  flashsae train --out runs/digits" in proc.stdout and "-V, --version" in proc.stdout


def test_short_version_flag(capsys):
    from flashsae import __version__

    with pytest.raises(SystemExit) as e:
        main(["-V"])
    assert e.value.code == 0 and capsys.readouterr().out == f"flashsae {__version__}\n"


def test_help_says_which_defaults_come_from_the_data():
    from flashsae.cli import build_parser, subcommand_parser

    help_text = {a.dest: " ".join(a.help.split()) for a in subcommand_parser(build_parser(), "train")._actions}
    assert help_text["d_sae"] == ("Number of latents (dictionary size). (default from the data: 8 x the input width, "
                                  "fewer for fewer than 64 training rows per column)")
    assert help_text["batch_size"].startswith("Rows per optimizer step; default from the data: 2048")
    assert help_text["rows"].startswith("Training rows to process in total (over several epochs); default from the "
                                        "data: max(20 epochs")
    assert "None" not in help_text["batch_size"] + help_text["rows"] + help_text["threads"]


def test_help_lists_generated_flags(capsys):
    from flashsae import models

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    model_flags = ["--" + name.replace("_", "-") for name in models.options() if name != "d_sae"]
    for flag in ("--latents", *model_flags, "--standardize", "--drop-nonfinite", "--checkpoint-every", "--resume",
                 "examples:"):
        assert flag in out


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_help_groups_model_options_by_architecture_with_their_defaults(command):
    """A flag sits in the group of the architectures that have it; its help gives each one's default."""
    import dataclasses

    from flashsae import models
    from flashsae.cli import build_parser, subcommand_parser

    parser = subcommand_parser(build_parser(), command)
    title = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    help_text = {a.dest: " ".join(a.help.split()) for a in parser._actions}
    shared = {f.name for f in dataclasses.fields(models.ModelConfig)}
    for name, per_arch in models.options().items():
        if name in shared:
            assert title[name] == "model", name
        else:
            assert title[name].endswith(" options") and set(per_arch) == set(
                title[name].removesuffix(" options").replace(" and ", ", ").split(", ")), (name, title[name])
        given = [d for d in per_arch.values() if d not in (None, (), dataclasses.MISSING)]
        if not given:
            continue
        # "(default: A; x and y: B)" or "(default: x: A; y and z: B)": A for every owner not named
        parts = help_text[name].rsplit("(default: ", 1)[1].removesuffix(")").split("; ")
        owners = {arch: value for part in parts if ": " in part for names, value in [part.rsplit(": ", 1)]
                  for arch in names.replace(" and ", ", ").split(", ")}
        general = next((part for part in parts if ": " not in part), None)
        for arch, default in per_arch.items():
            if default not in (None, (), dataclasses.MISSING):
                assert owners.get(arch, general) == str(default), (name, arch, help_text[name])
    assert title["k"].startswith("batchtopk, ") and "(default: 8)" in help_text["k"]
    assert "(default: True; crosscoder and kl: False)" in help_text["normalize_decoder"]
