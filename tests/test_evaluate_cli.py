"""flashsae evaluate on the training data scores the held-out rows, and says which rows it scored."""
import json

import numpy as np
import pytest

from flashsae.cli import main

FAST = ["--latents", "32", "--k", "3", "--rows", "4096", "--batch-size", "128", "--quiet", "--threads", "1"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from flashsae.data import make_synthetic

    X, _ = make_synthetic(rows=3000, d=16, atoms=24, active=2, noise=0.01, seed=3)
    path = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(path, X)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("evaluate") / "run"
    assert main(["train", str(data), "--out", str(out), "--seed", "5", *FAST]) == 0
    return out


def evaluation(run):
    return json.loads((run / "evaluation.json").read_text())


def test_training_data_scores_the_held_out_rows(trained, data, capsys):
    code, out, _ = run_cli(["evaluate", trained, data], capsys)
    assert code == 0
    assert out.splitlines()[0] == f"{data}, held-out rows of the training data (300):"
    saved, final = evaluation(trained), json.loads((trained / "metrics.json").read_text())
    assert saved["evaluated_on"] == "held-out rows of the training data (300)" and saved["rows"] == 300
    # the rows training held out (seed 5), so the numbers are training's own final evaluation
    assert saved["fvu"] == pytest.approx(final["fvu"], rel=1e-6)
    assert saved["l0"] == pytest.approx(final["l0"], rel=1e-6)


def test_rows_all_scores_every_row_and_says_training_rows_are_included(trained, data, capsys):
    code, out, _ = run_cli(["evaluate", trained, data, "--rows", "all"], capsys)
    assert code == 0
    assert out.splitlines()[0] == f"{data}, all 3000 rows of the training data (training rows included):"
    assert evaluation(trained)["rows"] == 3000


def test_other_data_scores_all_rows(trained, data, tmp_path, capsys):
    X = np.load(data)
    fewer, changed = tmp_path / "fewer.npy", tmp_path / "changed.npy"
    np.save(fewer, X[:1000])
    np.save(changed, X + 1.0)  # the same shape, other rows: told apart by the fingerprint
    for path, n in ((fewer, 1000), (changed, 3000)):
        code, out, _ = run_cli(["evaluate", trained, path], capsys)
        assert code == 0
        assert out.splitlines()[0] == f"{path}, all {n} rows:"
        assert evaluation(trained)["evaluated_on"] == f"all {n} rows" and evaluation(trained)["rows"] == n


def test_held_out_rows_of_other_data_is_an_error(trained, data, tmp_path, capsys):
    other = tmp_path / "other.npy"
    np.save(other, np.load(data)[:1000])
    argv = ["evaluate", trained, other, "--rows", "held-out", "--out", tmp_path / "e.json", "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert err.strip() == (f"flashsae: error: --rows held-out: {other} (1000 rows x 16 columns) is not the data "
                           f"{trained} was trained on ({data}, 3000 rows x 16 columns), so none of it was held out; "
                           "use --rows all")
    assert not (tmp_path / "e.json").exists()


def test_held_out_split_skips_the_rows_training_dropped(data, tmp_path, capsys):
    X = np.load(data)
    X[[7, 1500, 2999]] = np.nan
    path = tmp_path / "holes.npy"
    np.save(path, X)
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--drop-nonfinite", *FAST]) == 0
    code, out, _ = run_cli(["evaluate", run, path, "--drop-nonfinite"], capsys)
    assert code == 0
    final = json.loads((run / "metrics.json").read_text())
    assert out.splitlines()[0] == f"{path}, held-out rows of the training data ({final['rows']}):"
    assert evaluation(run)["fvu"] == pytest.approx(final["fvu"], rel=1e-6)
    code, out, _ = run_cli(["evaluate", run, path, "--drop-nonfinite", "--rows", "all", "--json"], capsys)
    assert json.loads(out)["evaluated_on"] == "all 2997 rows of the training data (training rows included)"


def test_a_run_that_held_out_nothing(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--val-fraction", "0", *FAST]) == 0
    code, out, _ = run_cli(["evaluate", run, data, "--json"], capsys)
    assert code == 0
    assert json.loads(out)["evaluated_on"] == "all 3000 rows of the training data (training rows included)"
    code, _, err = run_cli(["evaluate", run, data, "--rows", "held-out", "--quiet"], capsys)
    assert code == 2
    assert err.strip() == (f"flashsae: error: --rows held-out: {run} held out none of {data} (val_fraction 0); "
                           "use --rows all")


def test_rows_flag_values(trained, capsys):
    from flashsae.cli import build_parser, subcommand_parser

    parser = subcommand_parser(build_parser(), "evaluate")
    assert parser.parse_args(["run", "--rows", "512"]).rows == 512  # the older spelling of --positions 512
    assert parser.parse_args(["run", "--rows", "held-out"]).rows == "held-out"
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(trained), "--rows", "some"])
    assert exit_info.value.code == 2
    assert "argument --rows: expected all or held-out, got 'some'" in capsys.readouterr().err
    code, _, err = run_cli(["evaluate", trained, "--text", "corpus.txt", "--rows", "all"], capsys)
    assert code == 2 and "--rows all chooses the rows of DATA; give DATA" in err
    code, _, err = run_cli(["evaluate", trained, "x.npy", "--rows", "100", "--quiet"], capsys)
    assert code == 2 and "--rows takes all or held-out, got 100" in err
