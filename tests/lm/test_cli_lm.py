"""harvest -> train -> evaluate -> browse -> export -> import, through the command line."""
import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from flashsae.cli import main  # noqa: E402


def test_cli_walkthrough(tmp_path, tiny_gpt2, corpus, capsys):
    acts, run, site = tmp_path / "acts", tmp_path / "run", tmp_path / "site"
    harvest = ["harvest", "--model", str(tiny_gpt2), "--hook", "transformer.h.0", "--text", str(corpus),
               "--out", str(acts), "--rows", "2000", "--context", "64", "--shard-rows", "1000", "--quiet"]
    assert main(harvest) == 0
    assert main(harvest) == 0  # again: already complete, nothing to do
    manifest = json.loads((acts / "manifest.json").read_text())
    assert manifest["rows"] == 2000 and manifest["complete"]

    assert main(["train", str(acts), "--latents", "128", "--k", "8", "--rows", "10000", "--batch-size", "256",
                 "--out", str(run), "--quiet"]) == 0

    # model, hook and context default to the harvest's; contexts after the harvested ones are held out
    assert main(["evaluate", str(run), "--text", str(corpus), "--rows", "512", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["downstream"]
    assert metrics["hook"] == "transformer.h.0" and metrics["start_context"] == manifest["next_context"]
    assert metrics["kind"] == "causal-lm" and metrics["contexts"] == 8
    for key in ("loss_clean", "loss_spliced", "loss_zero", "loss_recovered", "kl_spliced", "kl_zero"):
        assert isinstance(metrics[key], float)
    assert metrics["hook_fvu"] < 0.8
    assert (run / "evaluation.json").is_file()

    assert main(["evaluate", str(run), str(acts), "--quiet"]) == 0  # plain reconstruction metrics still work

    assert main(["browse", str(run), "--acts", str(acts), "--out", str(site), "--latents", "4", "--top", "3",
                 "--no-promoted", "--quiet"]) == 0
    assert (site / "index.html").is_file() and not (site / "latent-00004.html").exists()
    assert "Tokens it promotes" not in (site / "latent-00003.html").read_text()  # tokenizer only

    assert main(["export", str(run), "--format", "saelens", "--out", str(tmp_path / "sl")]) == 0
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8 and cfg["metadata"]["hook_name"] == "transformer.h.0"
    assert main(["import", str(tmp_path / "sl"), "--out", str(tmp_path / "back")]) == 0
    assert main(["info", str(tmp_path / "back")]) == 0


def test_cli_user_errors(tmp_path, tiny_gpt2, corpus, capsys):
    assert main(["harvest", "--model", str(tiny_gpt2), "--hook", "h.0", "--text", str(corpus),
                 "--out", str(tmp_path / "a"), "--rows", "10"]) == 2
    assert "no module named 'h.0'" in capsys.readouterr().err
    assert main(["harvest", "--model", str(tiny_gpt2), "--hook", "transformer.h.0", "--text", str(corpus),
                 "--out", str(tmp_path / "a"), "--rows", "10", "--dtype", "bfloat16"]) == 2
    assert "--format safetensors" in capsys.readouterr().err
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "neither a SAELens directory" in capsys.readouterr().err


def test_cli_train_on_the_fly(tmp_path, tiny_gpt2, corpus, capsys):
    assert main(["train", "--model", str(tiny_gpt2), "--hook", "transformer.h.0", "--text", str(corpus),
                 "--context", "32", "--stat-rows", "1024", "--shuffle-rows", "512", "--rows", "4096",
                 "--batch-size", "128", "--latents", "64", "--k", "4", "--out", str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["rows_seen"] == 4096
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data_stats"]["activations"]["context"] == 32


def harvest_args(model, corpus, out, **changes):
    args = {"--model": str(model), "--hook": "transformer.h.0", "--text": str(corpus), "--out": str(out),
            "--rows": "600", "--context": "32", "--shard-rows": "256", **changes}
    return ["harvest", *(v for kv in args.items() for v in kv), "--quiet"]


@pytest.mark.parametrize("mistake", ["hook", "text", "model"])
def test_a_failed_harvest_leaves_nothing_and_the_corrected_command_runs(tmp_path, tiny_gpt2, corpus, capsys,
                                                                       mistake):
    out = tmp_path / "acts"
    wrong = {"hook": {"--hook": "transformer.h0"}, "text": {"--text": str(tmp_path / "missing.txt")},
             "model": {"--model": "nobody/no-such-model"}}[mistake]
    message = {
        "hook": "flashsae: error: the model has no module named 'transformer.h0'; did you mean transformer.h.0, "
                "transformer.h, transformer.h.1? (names as in model.named_modules())",
        "text": f"flashsae: error: corpus {tmp_path / 'missing.txt'}: no such file or directory.",
        "model": "flashsae: error: cannot load model 'nobody/no-such-model' offline: it is not a model directory "
                 "and not in the local Hugging Face cache",
    }[mistake]
    assert main(harvest_args(tiny_gpt2, corpus, out, **wrong)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bars
    assert err.startswith(message), err
    assert not out.exists()
    assert main(harvest_args(tiny_gpt2, corpus, out)) == 0  # no --overwrite needed
    assert json.loads((out / "manifest.json").read_text())["rows"] == 600


def test_ctrl_c_says_how_to_continue_and_the_same_command_does(tmp_path, monkeypatch, tiny_gpt2, corpus, capsys):
    from flashsae.data import open_source
    from flashsae.lm import harvest as H

    real_flush = H._ShardWriter._flush
    calls = {"n": 0}

    def interrupted_after_one_shard(self, limit):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        real_flush(self, limit)

    out = tmp_path / "acts"
    monkeypatch.setattr(H._ShardWriter, "_flush", interrupted_after_one_shard)
    assert main(harvest_args(tiny_gpt2, corpus, out)) == 130
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"flashsae: harvest interrupted with {rows:,} of 600 rows in {out}; "
        "run the same command again to continue after the last complete shard")
    monkeypatch.setattr(H._ShardWriter, "_flush", real_flush)
    assert main(harvest_args(tiny_gpt2, corpus, out)) == 0
    assert main(harvest_args(tiny_gpt2, corpus, tmp_path / "straight")) == 0
    np.testing.assert_array_equal(open_source(out).read(0, 600), open_source(tmp_path / "straight").read(0, 600))


def test_harvest_several_hooks_then_train_on_one(tmp_path, tiny_gpt2, corpus, capsys):
    out = tmp_path / "acts"
    args = harvest_args(tiny_gpt2, corpus, out)
    hook = args.index("--hook") + 1
    args[hook:hook + 1] = ["transformer.h.0", "transformer.h.1"]
    assert main(args[:-1]) == 0  # not --quiet
    assert capsys.readouterr().out.splitlines()[-3:] == [
        f"{out / 'transformer.h.0'}: 600 rows x 64 from {tiny_gpt2} at transformer.h.0 in 3 shards",
        f"{out / 'transformer.h.1'}: 600 rows x 64 from {tiny_gpt2} at transformer.h.1 in 3 shards",
        f"next: flashsae train {out / 'transformer.h.0'} --out RUN_DIR"]
    assert main(["train", str(out / "transformer.h.1"), "--latents", "32", "--k", "4", "--rows", "2000",
                 "--batch-size", "100", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data_stats"]["n_rows"] == 600 and cfg["data_stats"]["d_in"] == 64


def test_evaluate_finds_model_hook_and_corpus_from_another_directory(tmp_path, monkeypatch, tiny_gpt2, corpus,
                                                                    capsys):
    import shutil

    from flashsae.data import open_source

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copy(corpus, work / "corpus.txt")
    monkeypatch.chdir(work)  # relative paths, as people type them
    assert main(harvest_args(tiny_gpt2, "corpus.txt", "acts")) == 0
    assert main(["train", "acts", "--latents", "32", "--k", "4", "--rows", "2000", "--batch-size", "100",
                 "--out", "runs/x", "--quiet"]) == 0
    manifest = json.loads((work / "acts" / "manifest.json").read_text())
    assert open_source("acts").provenance == {
        "model": str(tiny_gpt2.resolve()), "hook": "transformer.h.0", "text": str(work / "corpus.txt"),
        "context": 32, "keep_special": False, "next_context": manifest["next_context"], "path": str(work / "acts")}

    monkeypatch.chdir(elsewhere)
    evaluate = ["evaluate", str(work / "runs" / "x"), "--text", str(work / "corpus.txt"), "--rows", "64", "--json"]
    assert main(evaluate) == 0
    metrics = json.loads(capsys.readouterr().out)["downstream"]
    assert (metrics["model"], metrics["hook"]) == (str(tiny_gpt2.resolve()), "transformer.h.0")
    assert metrics["context"] == 32 and metrics["start_context"] == manifest["next_context"]

    # A run that records its provenance needs no harvest at all any more.
    config = work / "runs" / "x" / "config.json"
    cfg = json.loads(config.read_text())
    if "provenance" not in cfg["data_stats"]:  # until training copies Source.provenance into data_stats
        cfg["data_stats"]["provenance"] = open_source(work / "acts").provenance
        config.write_text(json.dumps(cfg))
    assert cfg["data_stats"]["provenance"] == {**open_source(work / "acts").provenance}
    shutil.rmtree(work / "acts")
    assert main(evaluate) == 0
    again = json.loads(capsys.readouterr().out)["downstream"]
    assert (again["hook"], again["start_context"]) == ("transformer.h.0", manifest["next_context"])
