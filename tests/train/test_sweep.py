import csv
import json

import pytest
from matplotlib import image as mpimg

from flashsae import ConfigError, io
from flashsae.cli import build_parser, main
from flashsae.cli.sweep import grid_from_args
from flashsae.train.sweep import expand_grid, point_names, run_grid, sweep


def test_grid_is_the_cartesian_product_of_the_axes():
    grid = expand_grid({"k": [4, 8], "latents": [64, 128, 256]}, {"rows": 1000, "arch": "topk"})
    assert len(grid) == 6
    assert grid[0] == {"rows": 1000, "architecture": "topk", "k": 4, "d_sae": 64}
    assert grid[-1] == {"rows": 1000, "architecture": "topk", "k": 8, "d_sae": 256}
    assert point_names(grid)[:2] == ["k-4_latents-64", "k-4_latents-128"]
    assert point_names(expand_grid({"l1": [0.01, 1e-05]}, {"arch": "relu-l1"})) == ["l1-0.01", "l1-1e-05"]


def test_cli_options_with_several_values_become_axes():
    args = build_parser().parse_args(["sweep", "digits", "--arch", "relu-l1", "--l1", "0.01", "0.1", "1",
                                      "--encoder-hidden", "16", "--rows", "500", "--out", "x"])
    grid = grid_from_args(args)
    assert [p["l1"] for p in grid] == [0.01, 0.1, 1.0]
    assert all(p["architecture"] == "relu-l1" and p["rows"] == 500 and p["encoder_hidden"] == [16] for p in grid)


def test_a_grid_spans_architectures_with_different_options():
    grid = expand_grid({"arch": ["topk", "relu-l1"], "k": [2, 4]}, {"l1": 0.3, "rows": 500})
    assert grid == [{"rows": 500, "architecture": "topk", "k": 2}, {"rows": 500, "architecture": "topk", "k": 4},
                    {"l1": 0.3, "rows": 500, "architecture": "relu-l1"}]  # the two relu-l1 points are one
    assert point_names(grid) == ["arch-topk_k-2", "arch-topk_k-4", "arch-relu-l1_l1-0.3"]
    grid = expand_grid({"arch": ["relu-l1", "batchtopk", "topk"], "l1": [0.1, 1.0], "k": [8]})
    assert point_names(grid) == ["arch-relu-l1_l1-0.1", "arch-relu-l1_l1-1", "arch-batchtopk_k-8", "arch-topk_k-8"]
    with pytest.raises(ConfigError, match=r"^option 'l1' applies to crosscoder, gated, relu-l1, relu-l1-transcoder, "
                                          r"not to any architecture of the grid \(batchtopk, topk\)$"):
        expand_grid({"arch": ["topk", "batchtopk"], "l1": [0.1, 1.0]})


def test_cli_sweep_across_architectures(capsys):
    args = build_parser().parse_args(["sweep", "digits", "--arch", "topk", "relu-l1", "--k", "2", "4", "--l1", "0.3",
                                      "--out", "D"])
    assert [p.get("k", p.get("l1")) for p in grid_from_args(args)] == [2, 4, 0.3]
    assert main(["sweep", "digits", "--arch", "topk", "batchtopk", "--l1", "0.3", "--out", "D"]) == 2
    assert capsys.readouterr().err == ("flashsae: error: option --l1 applies to crosscoder, gated, relu-l1, "
                                       "relu-l1-transcoder, not to any architecture of the grid (batchtopk, topk)\n")


def test_python_sweep_across_architectures(tmp_path):
    result = sweep("synthetic", tmp_path / "s", grid={"arch": ["topk", "relu-l1"], "k": [2, 4], "l1": [0.3]},
                   synthetic_rows=1000, synthetic_d=8, synthetic_atoms=16, latents=16, rows=2000, quiet=True)
    assert [r["name"] for r in result.rows] == ["arch-topk_k-2", "arch-topk_k-4", "arch-relu-l1_l1-0.3"]
    cfg = io.read_config(tmp_path / "s" / "arch-relu-l1_l1-0.3")
    assert cfg["architecture"] == "relu-l1" and cfg["model"]["l1"] == 0.3
    assert io.read_config(tmp_path / "s" / "arch-topk_k-4")["model"]["k"] == 4


def test_a_bad_point_fails_before_anything_is_trained(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        run_grid("digits", [{"k": 4}, {"k": 8, "bogus": 1}], tmp_path / "sweep")
    with pytest.raises(ConfigError, match="applies to crosscoder, gated, relu-l1, relu-l1-transcoder, not to"):
        run_grid("digits", expand_grid({"l1": [0.1, 1.0]}, {"arch": "topk"}), tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        run_grid("digits", [{"k": 4}], tmp_path / "sweep")


def test_sweep_trains_one_run_per_point_and_tabulates_them(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "synthetic", "--synthetic-rows", "3000", "--synthetic-d", "16", "--synthetic-atoms", "32",
            "--k", "1", "2", "8", "--latents", "32", "--rows", "4000", "--out", str(out), "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    with open(out / io.SWEEP_TABLE_FILE, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [m["name"] for m in printed["models"]] == ["k-1", "k-2", "k-8"]
    for row in table:
        assert io.read_config(out / row["run_dir"])["model"]["k"] == int(row["k"])
        assert (out / row["run_dir"] / io.MODEL_FILE).is_file()
        assert row["architecture"] == "topk" and int(row["d_sae"]) == 32
        assert 0 < float(row["fvu"]) < 1 and float(row["rows_per_s"]) > 0 and 0 <= float(row["dead_fraction"]) < 1
        assert not (out / row["run_dir"] / io.ATLAS_FILE).exists()  # not images
    l0 = [float(r["l0"]) for r in table]
    assert l0 == sorted(l0) and l0[0] < l0[-1]
    fvu = [float(r["fvu"]) for r in table]
    assert fvu == sorted(fvu, reverse=True)  # more active latents reconstruct better
    img = mpimg.imread(out / io.TRADEOFF_FILE)
    assert img.shape[1] > 2 * img.shape[0] and img[..., :3].std() > 0.02
