"""The docs are checked against the code: CLI pages against --help, example commands by running them."""
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from flashsae.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
SMALL = ["--rows", "640"]  # examples run as written, only shorter


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", DOCS / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_pages_match_help():
    gen = load_generator()
    stale = gen.stale_pages()
    assert not stale, f"docs/cli pages out of date: {stale}; run python docs/gen_cli_docs.py"
    from flashsae.cli import SUBCOMMANDS

    assert {f"{name}.md" for name in SUBCOMMANDS} <= {p.name for p in (DOCS / "cli").glob("*.md")}


def test_models_tables_match_the_registry():
    gen = load_generator()
    stale = gen.stale_tables()
    assert not stale, f"models tables out of date in {stale}; run python docs/gen_cli_docs.py"
    from flashsae import models

    rows = gen.models_table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == sorted(models.names(), key=lambda n: (n != models.DEFAULT, n))


def test_models_table_follows_a_new_architecture():
    from dataclasses import dataclass

    import torch

    from flashsae import models

    @dataclass(frozen=True, kw_only=True)
    class PlainConfig(models.ModelConfig):
        gain: float = 1.5
        """Made up."""

    class Plain(models.SparseAutoencoder):
        """Plain ReLU codes | with a pipe."""

        config_cls = PlainConfig

        def activate(self, pre_acts):
            return torch.relu(pre_acts), pre_acts.new_zeros(())

    gen = load_generator()
    with models.registered("plain-doc", Plain):
        assert "| `plain-doc` | Plain ReLU codes \\| with a pipe. | `--gain` 1.5 |" in gen.models_table()
        assert gen.stale_tables() == ["README.md", "docs/guide.md"]
    assert gen.stale_tables() == []


def test_every_subcommand_has_quiet_and_json():
    pages = load_generator().render_pages()
    missing = [name for name, text in pages.items() if name != "README.md"
               and not ("--quiet" in text and "--json" in text)]
    assert not missing, f"subcommands without --quiet/--json: {missing}"


def test_stale_page_is_detected(tmp_path):
    gen = load_generator()
    for name, text in gen.render_pages().items():
        (tmp_path / name).write_text(text)
    assert gen.stale_pages(tmp_path) == []
    (tmp_path / "train.md").write_text((tmp_path / "train.md").read_text().replace("--out OUT", "--out DIR", 1))
    (tmp_path / "gone.md").write_text("# flashsae gone\n")
    assert gen.stale_pages(tmp_path) == ["gone.md", "train.md"]


def blocks(page: str):
    """(language, code) of each fenced block, in order."""
    return re.findall(r"```(bash|python)\n(.*?)```", (DOCS / "examples" / page).read_text(), flags=re.S)


def shrink(argv: list[str]) -> list[str]:
    """Drop --rows/--epochs and append SMALL for training commands; --quiet everywhere."""
    if argv[0] in ("train", "sweep"):
        out, skip = [], False
        for a in argv:
            if skip:
                skip = False
            elif a in ("--rows", "--epochs"):
                skip = True
            else:
                out.append(a)
        argv = out + SMALL
    return argv + ["--quiet"]


@pytest.mark.parametrize("page", ["digits.md", "csv.md"])
def test_example_commands_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    n_commands = 0
    for language, code in blocks(page):
        if language == "python":
            exec(compile(code, f"{page} python block", "exec"), {"__name__": "__example__"})
            continue
        for line in code.strip().splitlines():
            argv = shlex.split(line, comments=True)
            assert argv[0] == "flashsae", line
            assert main(shrink(argv[1:])) == 0, f"{page}: {line}\n{capsys.readouterr().err}"
            n_commands += 1
    assert n_commands >= 4
    assert any(tmp_path.glob("runs/*/report.html")) or any(tmp_path.glob("*.html"))
