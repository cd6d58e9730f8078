"""Transformer models: everything that reads a neural network rather than a matrix of rows.

corpus.py       text corpora (.txt, .jsonl, .parquet, folders, saved datasets) as token contexts
activations.py  loading a local Hugging Face model, forward hooks (several per pass), row filters
harvest.py      `flashsae harvest`: activations of one or more modules written to resumable shards
stream.py       training on the fly: a model's activations streamed into the trainer
downstream.py   spliced evaluation: the SAE's reconstruction put back into the model (loss recovered)
browse.py       `flashsae browse`: a static latent browser (site.py holds its page templates)

transformers is imported only inside the functions that need it. Imports data, io, eval, errors;
nothing in the engine imports this package except the on-the-fly stream.
"""
