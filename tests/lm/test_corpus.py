import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from flashsae.errors import ConfigError, DataError  # noqa: E402
from flashsae.lm.corpus import iter_contexts, iter_documents, special_wrapping  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_tok(tiny_gpt2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2)


@pytest.fixture(scope="module")
def bert_tok(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def test_special_wrapping(gpt2_tok, bert_tok):
    assert special_wrapping(gpt2_tok) == ([], [])
    assert special_wrapping(bert_tok) == ([bert_tok.cls_token_id], [bert_tok.sep_token_id])


def test_contexts_concatenate_documents_with_separators(tmp_path, gpt2_tok):
    docs = ["alpha beta gamma delta", "the quick brown fox jumps over the lazy dog"] * 20
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ctxs = list(iter_contexts(path, gpt2_tok, 16))
    stream = []
    for d in docs:
        stream += gpt2_tok(d, add_special_tokens=False)["input_ids"] + [gpt2_tok.eos_token_id]
    assert len(ctxs) == len(stream) // 16
    np.testing.assert_array_equal(np.concatenate(ctxs), stream[:16 * len(ctxs)])
    # resuming skips exactly the contexts already done
    later = list(iter_contexts(path, gpt2_tok, 16, start=3))
    np.testing.assert_array_equal(np.stack(later), np.stack(ctxs[3:]))


def test_bert_contexts_are_wrapped(corpus, bert_tok):
    ctx = next(iter_contexts(corpus, bert_tok, 32))
    assert len(ctx) == 32 and ctx[0] == bert_tok.cls_token_id and ctx[-1] == bert_tok.sep_token_id
    assert not np.isin(ctx[1:-1], [bert_tok.cls_token_id, bert_tok.pad_token_id]).any()


def test_formats_and_folders(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document\nsecond line\n")
    (folder / "sub" / "b.jsonl").write_text('{"text": "from jsonl"}\n\n{"text": "again"}\n')
    pq.write_table(pa.table({"text": ["from parquet", ""]}), folder / "c.parquet")
    (folder / "ignored.csv").write_text("x\n")
    docs = [t for t, _ in iter_documents(folder)]
    assert docs == ["first document\nsecond line\n", "from parquet", "from jsonl", "again"]


def test_cycle_restarts_the_corpus(tmp_path, gpt2_tok):
    path = tmp_path / "short.txt"
    path.write_text("one two three four five six seven eight nine ten " * 3)
    once = list(iter_contexts(path, gpt2_tok, 8))
    it = iter_contexts(path, gpt2_tok, 8, cycle=True)
    many = [next(it) for _ in range(3 * len(once))]
    np.testing.assert_array_equal(np.stack(many[:len(once)]), np.stack(once))
    np.testing.assert_array_equal(np.stack(many[len(once):2 * len(once)]), np.stack(once))


def test_errors(tmp_path, gpt2_tok, bert_tok):
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_documents(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="bad.jsonl, line 1"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(DataError, match="fewer than"):
        list(iter_contexts(tmp_path / "tiny.txt", gpt2_tok, 64))
    with pytest.raises(ConfigError, match="no room"):
        list(iter_contexts(tmp_path / "tiny.txt", bert_tok, 2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no"):
        list(iter_documents(tmp_path / "empty"))


def test_saved_datasets_directory(tmp_path):
    (tmp_path / "ds").mkdir()
    try:
        import datasets
    except ImportError:
        (tmp_path / "ds" / "dataset_info.json").write_text("{}")
        with pytest.raises(ConfigError, match="pip install datasets"):
            list(iter_documents(tmp_path / "ds"))
        return
    datasets.Dataset.from_dict({"text": ["one", "", "two"], "id": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    assert [t for t, _ in iter_documents(tmp_path / "ds")] == ["one", "two"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    assert [t for t, _ in iter_documents(tmp_path / "dd")] == ["a"]
