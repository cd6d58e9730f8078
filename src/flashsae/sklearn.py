"""`SparseAutoencoder`: the scikit-learn estimator facade over the flashsae engine.

`fit` is one call of `flashsae.train.api.train` (the same run the CLI makes); `partial_fit` drives
one `TrainingRun` through the same loop, extended by a number of steps for each new block of rows;
`transform` encodes with the trained encoder or with orthogonal matching pursuit (`flashsae.omp`)
over the learned decoder atoms. The estimator only translates parameters and arrays: it holds no
training logic of its own. Imports `train`,
`models`, `preprocess`, `data` and `omp`; nothing imports this module except `flashsae.__init__`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import numbers
import types

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(estimator, X, **kwargs):
        return estimator._validate_data(X, **kwargs)  # noqa: SLF001 - scikit-learn's own API before 1.6

TRANSFORM_ALGORITHMS = ("encoder", "omp")
_DTYPES = [np.float64, np.float32]
_CHUNK_ROWS = 4096
_DEFAULT_N_NONZERO = 8
SMALL_ROWS = 4096
"""`fit` without a budget (epochs and batch_size None) trains on at most this many rows full-batch:
every step sees every row, so few steps suffice and the per-step overhead is paid few times."""
SMALL_STEPS = {"omp": 50, "encoder": 200}
"""Full-batch steps of such a fit, by transform algorithm. OMP codes need good atoms only, which
settle first; the encoder takes longer. Held-out FVU on scikit-learn's digits (1,500 rows, 256
atoms, 297 held out, mean of seeds 0-2): 8-atom OMP codes 0.0897 at 30 steps, 0.0851 at 40, 0.0824
at 50, 0.0807 at 80 (the library default's 2,343 steps: 0.0766; MiniBatchDictionaryLearning
0.0790 on centred rows); encoder codes reach the library default's error at about 200 steps on
digits, wine and diabetes (diabetes: 0.057 at 50 steps, 0.012 at 200, 0.009-0.013 by default)."""
SMALL_LR = 0.02
"""Adam learning rate of such a fit when lr is None: full batches take a larger step than the
library's rate for small batches (1.6e-3 at 256 latents). Held-out OMP FVU on digits at 50
steps: 0.0848 at 0.01, 0.0808 at 0.015, 0.0824 at 0.02 (means of seeds 0-2); 0.0874 at 0.03 and
0.1065 at 0.05 (seed 0). 0.02 trains the encoder better than 0.015 (0.145 against 0.151)."""


class _WithModelOptions:
    """Wraps `__init__` so that its signature names every model option registered now.

    scikit-learn reads an estimator's parameters from the signature of `__init__` (`get_params`,
    `clone`, `set_params`, the estimator checks). The wrapped function takes the model options as
    `**model_options`; the signature shown instead lists them as keyword-only parameters with
    default None, asked of the architecture registry on each call, so an architecture registered
    after this module was imported brings its options along.
    """

    def __init__(self, func):
        functools.update_wrapper(self, func)
        self.func = func
        self.own = frozenset(p.name for p in inspect.signature(func).parameters.values()
                             if p.name != "self" and p.kind != p.VAR_KEYWORD)

    def __get__(self, obj, cls=None):
        return self if obj is None else types.MethodType(self, obj)

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self.func)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in _model_options()]
        return sig.replace(parameters=params)


def _model_options() -> list[str]:
    """The estimator's model-option parameters: the config fields of every registered architecture
    except d_in (from the data), d_sae (`n_components`) and those that are explicit parameters."""
    from flashsae import models

    own = SparseAutoencoder.__init__.own
    return sorted(name for name in models.options() if name != "d_sae" and name not in own)


class SparseAutoencoder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Sparse autoencoder trained by flashsae, as a scikit-learn transformer.

    Learns an encoder ``h = f(x)`` with sparse codes and a dictionary of decoder atoms so that
    ``x ~ g(h)``. Rows are standardised (fitted on the training rows) before training; `transform`
    and `inverse_transform` work in the data's own units.

    Parameters
    ----------
    architecture : str, default="topk"
        A registered architecture (``flashsae.names()``).
    n_components : int, default=None
        Number of latents (dictionary atoms); None picks 8 * n_features, capped
        at the largest power of two up to (training rows) / 8, never below n_features.
    encoder_hidden : tuple of int, default=()
        Widths of ReLU hidden layers before the code layer.
    decoder_hidden : tuple of int, default=()
        Widths of ReLU hidden layers after the code layer. A nonlinear decoder has no atoms to
        pursue, so it cannot be combined with ``transform_algorithm="omp"``.
    epochs : float, default=None
        Passes over the training rows. None with ``batch_size=None`` on at most 4,096 training
        rows (``SMALL_ROWS``) trains full-batch: 50 steps for ``transform_algorithm="omp"``, 200
        for the encoder (``SMALL_STEPS``); on more rows, or with a batch size, the library default
        (at least 20 epochs, 2M rows and 2000 rows per latent, at most 200 epochs). In
        `partial_fit`, passes over each block (None: one).
    batch_size : int, default=None
        Rows per optimizer step; None: every training row in a full-batch fit (see ``epochs``),
        else the library default. Never more than the number of training rows, so any number of
        rows can be fitted.
    lr : float, default=None
        Adam learning rate; None picks 0.02 in a full-batch fit (``SMALL_LR``), else scales it
        with n_components.
    standardize : {"global", "column", "norm", "none"}, default="global"
        Standardisation fitted on the training rows. "global" centres each feature and divides
        all by one scale, so the training loss is proportional to the squared error in data
        units that `score` reports, as for PCA; put a ``StandardScaler`` before the estimator to
        weigh features equally (or use "column").
    val_fraction : float, default=0.0
        Fraction of rows held out from training for the evaluation in ``result_.metrics``.
    transform_algorithm : {"encoder", "omp"}, default="encoder"
        How `transform` computes codes: the trained encoder, or orthogonal matching pursuit
        over the learned decoder atoms (in the standardised space, after subtracting the decoder
        bias), with ``transform_n_nonzero_coefs`` atoms per row.
    transform_n_nonzero_coefs : int, default=None
        Atoms per row for "omp"; None means `k` when set, else 8.
    sparse_output : bool, default=False
        `transform` returns a ``scipy.sparse.csr_matrix`` instead of a dense array.
    verbose : bool, default=False
        Show progress bars and the training summary.
    random_state : int, RandomState instance or None, default=None
        Seed of initialisation and shuffling; an int is used as the seed itself.
    device : str, default="auto"
        "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
    **model_options : default=None
        The architectures' own options, one parameter each: every field of every registered
        architecture's config class (``flashsae.models.get(name).config_cls``, whose field
        docstrings describe them; ``flashsae.models.options()`` lists them with each
        architecture's default) except ``d_in`` and ``d_sae`` (``n_components``), such as ``k``
        (topk, batchtopk) or ``l1`` (relu-l1). They are parameters like the others for
        `get_params`, `set_params`, `clone` and searches, including those of an architecture
        registered later. None keeps the architecture's default; `fit` passes an option on only
        when the chosen architecture has it, so one grid can span several architectures, and the
        architecture's config class validates the values. An unset ``k`` never exceeds
        n_components, and with ``transform_algorithm="omp"`` is half of
        ``transform_n_nonzero_coefs``: atoms trained with sparser codes serve OMP better
        (held-out FVU of 8-atom OMP codes on scikit-learn's digits, 256 atoms, 50 epochs: 0.083
        trained at k=4, 0.092 at k=8).

    Attributes
    ----------
    model_ : flashsae.SAEModule
        The trained torch model (encode/decode in data units).
    result_ : flashsae.TrainResult
        Training summary: metrics, steps, rows seen, wall time.
    components_ : ndarray of shape (n_components, n_features)
        Decoder atoms in data units: ``x_hat = codes @ components_ + offset`` for a linear decoder.
    n_components_ : int
        Number of latents actually used.
    n_features_in_ : int
        Number of features seen during `fit`.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Column names seen during `fit`, when X has string column names.

    See Also
    --------
    sklearn.decomposition.MiniBatchDictionaryLearning : dictionary learning with lasso codes.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from flashsae import SparseAutoencoder
    >>> X = load_digits().data
    >>> sae = SparseAutoencoder(n_components=128, k=8, epochs=5, random_state=0).fit(X)
    >>> sae.transform(X[:2]).shape
    (2, 128)
    """

    @_WithModelOptions
    def __init__(self, architecture="topk", n_components=None, *, encoder_hidden=(), decoder_hidden=(), epochs=None,
                 batch_size=None, lr=None, standardize="global", val_fraction=0.0,
                 transform_algorithm="encoder", transform_n_nonzero_coefs=None, sparse_output=False,
                 verbose=False, random_state=None, device="auto", **model_options):
        for name in _model_options():
            setattr(self, name, model_options.pop(name, None))
        if model_options:  # what Python says for a keyword missing from an explicit signature
            raise TypeError(f"SparseAutoencoder.__init__() got an unexpected keyword argument "
                            f"{next(iter(model_options))!r}; model options are the config fields of "
                            f"the registered architectures (flashsae.models.options())")
        self.architecture = architecture
        self.n_components = n_components
        self.encoder_hidden = encoder_hidden
        self.decoder_hidden = decoder_hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.standardize = standardize
        self.val_fraction = val_fraction
        self.transform_algorithm = transform_algorithm
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.sparse_output = sparse_output
        self.verbose = verbose
        self.random_state = random_state
        self.device = device

    # ---- fitting ---------------------------------------------------------------------------
    def fit(self, X, y=None):
        """Train a new model on X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : SparseAutoencoder
        """
        X = _validate_data(self, X, reset=True, dtype=_DTYPES)
        self._check_transform_params()
        from flashsae.train.api import train

        options = self._train_options(*X.shape, self._seed(), small_budget=True)
        with _forked_rng(self.device):
            model, result = train(np.asarray(X, dtype=np.float32), quiet=not self.verbose, **options)
        self.model_ = model
        self.result_ = result
        self._run = None
        return self

    def partial_fit(self, X, y=None):
        """Continue training on one more block of rows (one pass, or `epochs` passes).

        The first call builds the model and fits the standardisation on its rows; later calls
        (also after `fit`) run more optimizer steps of the same model. The learning rate is
        constant: there is no schedule over an unknown number of calls.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : SparseAutoencoder
        """
        first = not hasattr(self, "model_")
        X = _validate_data(self, X, reset=first, dtype=_DTYPES)
        X = np.asarray(X, dtype=np.float32)
        if first:
            self._check_transform_params()
        with _forked_rng(self.device):
            self._partial_steps(X)
        return self

    # ---- transforming ----------------------------------------------------------------------
    def transform(self, X):
        """Sparse codes of X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to encode.

        Returns
        -------
        codes : ndarray or scipy.sparse.csr_matrix of shape (n_samples, n_components_)
            Dense unless ``sparse_output=True``; float32 for float32 input, else float64.
        """
        check_is_fitted(self)
        X = _validate_data(self, X, reset=False, dtype=_DTYPES)
        self._check_transform_params()
        chunks = (self._encode(X[start:start + _CHUNK_ROWS]).cpu().numpy().astype(X.dtype, copy=False)
                  for start in range(0, X.shape[0], _CHUNK_ROWS))
        if self.sparse_output:
            return sp.vstack([sp.csr_matrix(c) for c in chunks], format="csr")
        return np.concatenate(list(chunks))

    def inverse_transform(self, X):
        """Rows reconstructed from codes, in the data's own units.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_components_)
            Codes from `transform` (with either transform algorithm: both reconstruct as
            ``codes @ W_dec + b_dec`` in the standardised space for a linear decoder).

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        codes = check_array(X, accept_sparse="csr", dtype=_DTYPES)
        if codes.shape[1] != self.model_.d_sae:
            raise ValueError(f"codes have {codes.shape[1]} columns but the model has {self.model_.d_sae} "
                             f"components")
        out = np.empty((codes.shape[0], self.n_features_in_), dtype=codes.dtype)
        for start in range(0, codes.shape[0], _CHUNK_ROWS):
            chunk = codes[start:start + _CHUNK_ROWS]
            chunk = chunk.toarray() if sp.issparse(chunk) else chunk
            out[start:start + _CHUNK_ROWS] = self.model_.decode(_as_tensor(chunk)).cpu().numpy()
        return out

    def score(self, X, y=None):
        """Negative mean squared reconstruction error of X (higher is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to reconstruct through `transform` and `inverse_transform`.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        score : float
            ``-mean((X - inverse_transform(transform(X))) ** 2)``.
        """
        check_is_fitted(self)
        X = _validate_data(self, X, reset=False, dtype=_DTYPES)
        self._check_transform_params()
        total = 0.0
        for start in range(0, X.shape[0], _CHUNK_ROWS):
            chunk = X[start:start + _CHUNK_ROWS]
            x_hat = self.model_.decode(self._encode(chunk)).double().cpu().numpy()
            total += float(np.square(np.asarray(chunk, dtype=np.float64) - x_hat).sum())
        return -total / X.size

    # ---- fitted views ------------------------------------------------------------------------
    @property
    def components_(self) -> np.ndarray:
        check_is_fitted(self)
        return self.model_.atoms().cpu().numpy()

    @property
    def n_components_(self) -> int:
        check_is_fitted(self)
        return self.model_.d_sae

    @property
    def _n_features_out(self) -> int:
        return self.n_components_

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def __getstate__(self):
        state = super().__getstate__()
        # The optimizer is rebuilt by the next partial_fit; a pickle holds the model only.
        state.pop("_run", None)
        return state

    def __getattr__(self, name):
        # An estimator made before an architecture was registered has no attribute for its options.
        if not name.startswith("_") and not name.endswith("_") and name in _model_options():
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---- internals ---------------------------------------------------------------------------
    def _seed(self) -> int:
        if isinstance(self.random_state, numbers.Integral):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _train_options(self, n_rows: int, n_features: int, seed: int, *, small_budget: bool = False) -> dict:
        """Keyword options of `train()`: only those set, and only those the architecture has.

        `small_budget`: `fit` of at most SMALL_ROWS rows without epochs or batch_size trains
        full-batch (`_small_budget`); `partial_fit` keeps the library's batches.
        """
        from flashsae.train.prepare import auto_batch_size
        from flashsae.train.spec import model_fields

        relevant = model_fields(self.architecture)  # also validates the name
        options = {"architecture": self.architecture, "standardize": self.standardize,
                   "val_fraction": self.val_fraction, "seed": seed, "device": self.device}
        if self.n_components is not None:
            options["d_sae"] = self.n_components
        for name in ("epochs", "lr"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        for name in ("encoder_hidden", "decoder_hidden"):
            if getattr(self, name):
                options[name] = tuple(getattr(self, name))
        for name in _model_options():  # validated at fit by the architecture's config class
            if getattr(self, name) is not None and name in relevant:
                options[name] = getattr(self, name)
        if self.k is None and "k" in relevant:
            # An unset k never exceeds the number of latents, so any n_components fits.
            d_sae = self.n_components if self.n_components is not None else 8 * n_features
            k = self._n_nonzero() // 2 if self.transform_algorithm == "omp" else _field_default(self.architecture, "k")
            options["k"] = max(1, min(k, d_sae))
        n_val = int(round(self.val_fraction * n_rows)) if 0 <= self.val_fraction < 1 else 0
        n_train = max(1, n_rows - n_val)
        # Held-out rows are evaluated once, at the end: the estimator has no early stopping, and ten
        # evaluations cost more than the training of a small fit.
        options["eval_every"] = 0
        if small_budget and self.epochs is None and self.batch_size is None and n_train <= SMALL_ROWS:
            options.update(self._small_budget(n_train))
            return options
        options["batch_size"] = min(self.batch_size or auto_batch_size(n_train), n_train)
        return options

    def _small_budget(self, n_train: int) -> dict:
        """The default budget of a fit on at most SMALL_ROWS rows: SMALL_STEPS full-batch steps.

        The library default takes batches of 1/8 of the rows and up to 200 epochs: 2,343 steps on
        1,500 rows of digits (5.5-6.2 s), where per-step overhead, not arithmetic, sets the time.
        Full batches at SMALL_LR come within a few percent of its held-out error in 50 steps for
        OMP codes (bench/digits_omp.py). The rows are put on the device once, so that no reader
        thread starts for every epoch (an epoch is one step here).
        """
        from flashsae.train.prepare import resolve_device

        budget = {"batch_size": n_train, "epochs": float(SMALL_STEPS[self.transform_algorithm])}
        if self.lr is None:
            budget["lr"] = SMALL_LR
        if resolve_device(str(self.device)).type == "cpu":
            budget["rows_on_device"] = "yes"
        return budget

    def _check_transform_params(self) -> None:
        if self.transform_algorithm not in TRANSFORM_ALGORITHMS:
            raise ValueError(f"transform_algorithm must be one of {', '.join(TRANSFORM_ALGORITHMS)}, "
                             f"got {self.transform_algorithm!r}")
        if self.transform_algorithm == "omp" and self.decoder_hidden:
            raise ValueError("transform_algorithm='omp' needs a linear decoder; decoder_hidden is set")
        n = self.transform_n_nonzero_coefs
        if n is not None and (not isinstance(n, numbers.Integral) or n < 1):
            raise ValueError(f"transform_n_nonzero_coefs must be a positive integer, got {n!r}")

    def _n_nonzero(self) -> int:
        if self.transform_n_nonzero_coefs is not None:
            return int(self.transform_n_nonzero_coefs)
        return int(self.k) if self.k is not None else _DEFAULT_N_NONZERO

    @torch.no_grad()
    def _encode(self, X: np.ndarray) -> torch.Tensor:
        """Dense float32 codes (rows, n_components_) of raw rows X, on the model's device."""
        model = self.model_
        x = _as_tensor(X, device=model.W_dec.device)
        if self.transform_algorithm == "encoder":
            return model.encode(x)
        from flashsae.omp import omp

        # Pursuit over unit-norm atoms of the residual the decoder must explain, x_std - b_dec;
        # dividing by the norms makes codes @ W_dec + b_dec the reconstruction (KL models do not
        # keep unit-norm atoms).
        norms = model.W_dec.norm(dim=1).clamp_min(1e-12)
        values, indices = omp(model.standardizer(x) - model.b_dec, model.W_dec / norms[:, None],
                              min(self._n_nonzero(), model.d_sae))
        codes = values.new_zeros((x.shape[0], model.d_sae))
        return codes.scatter_(1, indices, values / norms[indices])

    def _partial_steps(self, X: np.ndarray) -> None:
        """One partial_fit: `epochs` passes (default one) over X by the estimator's TrainingRun.

        The first call (or the first after `fit`) builds the run on X: the standardisation is
        fitted on X, or taken from the model `fit` trained, whose weights the run continues. The
        learning rate and sparsity weight are constant: the number of future calls is unknown.
        """
        import dataclasses as dc

        from flashsae.train.loop import run_pass
        from flashsae.train.prepare import DataPass, plan_threads
        from flashsae.train.spec import RunSpec
        from flashsae.train.training_run import TrainingRun, TrainResult

        run = getattr(self, "_run", None)
        options = self._train_options(*X.shape, self._seed() if run is None else run.spec.train.seed)
        options.update(val_fraction=0.0, lr_warmup=0.0, lr_decay="none", sparsity_warmup=0.0,
                       epochs=self.epochs if self.epochs is not None else 1)
        spec = RunSpec.from_options(X, options)
        fitted = getattr(self, "model_", None)
        standardizers = {"x": (run.model if run is not None else fitted).standardizer} \
            if run is not None or fitted is not None else None
        dpass = DataPass.open(X, spec, standardizers=standardizers, show=False)
        if run is None:
            run = TrainingRun(spec, dpass, threads=plan_threads([spec], dpass, None)[0])
            if fitted is not None:  # continue the model fit() trained
                run.model.load_state_dict(fitted.state_dict())
            previous = getattr(self, "result_", None)
            self._before = (0.0, 0, 0) if previous is None else (previous.train_seconds, previous.rows_seen,
                                                                 previous.steps)
        else:
            run.dpass, run.spec = dpass, dc.replace(run.spec, train=dc.replace(run.spec.train,
                                                                               batch_size=spec.train.batch_size))
        n_steps = max(1, int(options["epochs"] * len(dpass.train_ids)) // dpass.batch_size)
        run.extend(n_steps)
        run.model.train()
        run_pass([run], dpass.batches(), show=self.verbose)
        run.finish(evaluate_final=False)
        self._run, self.model_ = run, run.model
        # Held-out metrics of an earlier fit no longer describe the model once it trains on.
        s, (secs, rows, steps) = run.state, self._before
        self.result_ = TrainResult({}, secs + s.elapsed, rows + s.rows_seen, steps + s.step, None, s.history)


def _field_default(architecture: str, name: str):
    from flashsae import models

    return {f.name: f.default for f in dataclasses.fields(models.get(architecture).config_cls)}[name]


def _as_tensor(X: np.ndarray, device=None) -> torch.Tensor:
    a = np.ascontiguousarray(X, dtype=np.float32)
    if not a.flags.writeable:  # torch.from_numpy warns on read-only memory (e.g. memmaps)
        a = a.copy()
    return torch.from_numpy(a).to(device) if device is not None else torch.from_numpy(a)


@contextlib.contextmanager
def _forked_rng(device: str):
    """Run training without disturbing the caller's global torch random state."""
    from flashsae.train.prepare import resolve_device

    dev = resolve_device(str(device))
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
