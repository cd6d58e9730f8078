"""Downstream evaluation: splice an SAE's reconstruction into a transformers model at the hooked module.

Three forward passes per batch of contexts: clean; *spliced*, with the hooked module's output
replaced by the SAE reconstruction; and *zero-ablated*, with that output replaced by zeros. Only
the positions the SAE was trained on are replaced (special tokens keep their clean activations
unless `keep_special`). Causal language models (class names ending in ForCausalLM or LMHeadModel)
report next-token cross-entropy and the KL divergence of the next-token distributions from the
clean ones; the fraction of loss recovered is (zero - spliced) / (zero - clean). Other models
(BERT-style encoders) report the cosine similarity and MSE of the final hidden states, and the
cosine of the mean-pooled embedding, spliced vs clean and zero-ablated vs clean.
Imports `data` and `errors`; never imports train or cli.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from flashsae.errors import ConfigError, DataError
from flashsae.lm import activations as A
from flashsae.lm.corpus import iter_contexts


@torch.no_grad()
def reconstruct(sae, x: Tensor) -> Tensor:
    """The model's output for raw activation rows x (rows, d_in), in x's dtype: the SAE's
    reconstruction of x, or a transcoder's estimate of its target."""
    return sae.reconstruct(x.float()).to(x.dtype)


@contextlib.contextmanager
def splice(module, state: dict):
    """While active, `module`'s output at positions state["mask"] (batch, seq) becomes state["fn"](rows).

    state["fn"] None leaves the output alone (the clean pass) and keeps it in state["clean"].
    """
    def hook(mod, inputs, output):
        fn = state.get("fn")
        h = A.module_output(output)
        if fn is None:
            state["clean"] = h
            return None
        new = h.clone()
        mask = state["mask"]
        new[mask] = fn(h[mask])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


@contextlib.contextmanager
def _read(module, into: dict, key):
    """While active, into[key] is `module`'s latest output."""
    def hook(mod, inputs, output):
        into[key] = A.module_output(output)

    handle = module.register_forward_hook(hook)
    try:
        yield into
    finally:
        handle.remove()


def is_causal_lm(model) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


@torch.no_grad()
def downstream_metrics(sae, model, tokenizer, hook: str | Sequence[str], text, *, rows: int = 4096,
                       context: int = 128, batch: int = 8, keep_special: bool = False, start_context: int = 0,
                       target_hook: str | Sequence[str] | None = None, progress: bool = False) -> dict:
    """Metrics of splicing `sae` into `model` at `hook` over about `rows` token positions of `text`.

    The model reads the outputs of the `hook` modules (side by side when there are several: the
    layers of a crosscoder) and writes those of the `target_hook` modules (a transcoder's output
    module, a cross-layer transcoder's layers), or of the `hook` modules themselves. Each written
    module's output is replaced by its block of the model's output, computed from the clean
    activations; the zero-ablation baseline zeroes the same outputs.

    Args:
        sae: a flashsae model whose widths match the modules'.
        model, tokenizer: from `flashsae.lm.activations.load_lm`.
        hook: module name(s) as in `model.named_modules()`.
        text: corpus path; contexts are cut as in `flashsae harvest`.
        rows: token positions to evaluate (rounded up to whole contexts).
        start_context: skip this many contexts first (e.g. those a harvest trained on).
        target_hook: the module(s) whose output a transcoder replaces; the hook metrics are then
            those of their outputs.

    Raises:
        DataError: the model's widths do not match the modules, or the corpus has no contexts left.
    """
    reads = [hook] if isinstance(hook, str) else list(hook)
    transcodes = bool(target_hook)  # reads some modules and writes others
    writes = [target_hook] if isinstance(target_hook, str) else list(target_hook) if transcodes else reads
    read_modules = [A.find_module(model, h) for h in reads]
    write_modules = [A.find_module(model, h) for h in writes]
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    specials = torch.as_tensor(A.special_ids(tokenizer), dtype=torch.long, device=device)
    causal = is_causal_lm(model)
    n_contexts = max(1, math.ceil(rows / context))
    acc = _Sums()
    states: list[dict] = [{} for _ in writes]
    read: dict = {}  # the read modules' outputs of the clean pass, when they are not the written ones
    from tqdm.auto import tqdm

    with contextlib.ExitStack() as stack:
        for module, state in zip(write_modules, states):
            stack.enter_context(splice(module, state))
        for i, module in enumerate(read_modules if transcodes else []):
            stack.enter_context(_read(module, read, i))
        bar = stack.enter_context(tqdm(total=n_contexts, unit="contexts", desc="downstream", disable=not progress))
        for ids in _batches(text, tokenizer, context, start_context, n_contexts, batch):
            ids = torch.from_numpy(ids).to(device)
            mask = torch.ones_like(ids, dtype=torch.bool) if keep_special else ~torch.isin(ids, specials)
            for state in states:
                state["mask"], state["fn"] = mask, None
            clean = _outputs(model, ids, causal)
            y_parts = [state.pop("clean")[mask] for state in states]
            x_parts = [read[i][mask] for i in range(len(reads))] if transcodes else y_parts
            x, y = torch.cat(x_parts, -1), torch.cat(y_parts, -1)
            if x.shape[-1] != sae.d_in or y.shape[-1] != sae.d_out:
                if len(reads) == 1 and not transcodes:
                    raise DataError(f"module {reads[0]!r} outputs width {x.shape[-1]} but the model expects "
                                    f"{sae.d_in}")
                widths = ", ".join(f"{h!r} {p.shape[-1]}" for h, p in zip([*reads, *writes], [*x_parts, *y_parts]))
                raise DataError(f"module widths ({widths}) do not match the model, which reads {sae.d_in} "
                                f"columns and writes {sae.d_out}")
            y_hat = reconstruct(sae, x)
            acc.add_hook(y, y_hat, sae.encode(x.float()))
            for state, block in zip(states, torch.split(y_hat, [p.shape[-1] for p in y_parts], -1)):
                state["fn"] = lambda h, block=block: block
            spliced = _outputs(model, ids, causal)
            for state in states:
                state["fn"] = torch.zeros_like
            zeroed = _outputs(model, ids, causal)
            if causal:
                acc.add_lm(ids, clean, spliced, zeroed)
            else:
                acc.add_encoder(clean, spliced, zeroed)
            acc.contexts += ids.shape[0]
            acc.positions += int(mask.sum())
            bar.update(ids.shape[0])
    if acc.contexts == 0:
        raise DataError(f"corpus {text} has no contexts after the first {start_context}; "
                        "evaluate on another corpus or skip fewer contexts")
    return acc.result(causal)


_PROVENANCE = ("model", "hook", "context", "keep_special", "text", "next_context")


def provenance(run_config: dict, run_dir: str | os.PathLike | None = None) -> dict:
    """Where a run's activations came from: model, hook, context, keep_special, text, next_context
    (and target_hook, the module a transcoder's target came from, when recorded).

    In order: what the run recorded of its harvest (config.json's data_stats.provenance, absolute
    paths), what it recorded of a capture on the fly (data_stats.activations), else the manifest
    of the harvest directory it was trained on, if it still exists: the data path as recorded when
    absolute; when relative, from the current directory or from a directory above `run_dir`, and
    only a harvest with the run's rows and width. {} when unknown.
    """
    stats = run_config.get("data_stats") or {}
    target = _one_harvest(stats.get("target_provenance"))
    extra = {"target_hook": target["hook"]} if target else {}
    for recorded in (_one_harvest(stats.get("provenance")), stats.get("activations")):
        if isinstance(recorded, dict) and recorded.get("model") and recorded.get("hook"):
            return {**{k: recorded.get(k) for k in _PROVENANCE}, **extra}
    acts = _harvest_dir(run_config, run_dir)
    if acts is None:
        return {}
    m = A.read_manifest(acts)
    if isinstance(m.get("provenance"), dict):  # absolute paths
        return {k: m["provenance"].get(k) for k in _PROVENANCE}
    return {"model": m.get("model_path") or m.get("model"), "hook": m.get("hook"), "context": m.get("context"),
            "keep_special": m.get("keep_special"), "text": m.get("text"), "next_context": m.get("next_context")}


def _one_harvest(recorded) -> dict | None:
    """A harvest's provenance, or that of several harvested layers read side by side (their hooks
    as a list, the rest from the first) when they came from one model; None when unknown."""
    if isinstance(recorded, dict) and isinstance(recorded.get("layers"), list):
        layers = recorded["layers"]
        if not all(isinstance(p, dict) and p.get("hook") for p in layers) \
                or len({p.get("model") for p in layers}) != 1:
            return None
        return {**layers[0], "hook": [p["hook"] for p in layers]}
    return recorded if isinstance(recorded, dict) and recorded.get("hook") else None


def _harvest_dir(run_config: dict, run_dir) -> Path | None:
    """The absolute path of the harvest directory a run was trained on, or None (see `provenance`)."""
    data = (run_config.get("data") or {}).get("data")
    if not isinstance(data, str):
        return None
    stats = run_config.get("data_stats") or {}
    path = Path(data).expanduser()
    bases = [Path.cwd()] + (list(Path(run_dir).resolve().parents) if run_dir is not None else [])
    for candidate in [path] if path.is_absolute() else [base / path for base in bases]:
        if (candidate / A.MANIFEST_FILE).is_file():
            m = A.read_manifest(candidate)
            same = [stats.get(k) in (None, m.get(key)) for k, key in (("n_rows", "rows"), ("d_in", "d_in"))]
            if all(same):  # the rows the run was trained on, not another harvest of that name
                return candidate.resolve()
    return None


def evaluate_downstream(sae, *, text, model: str | None = None, hook: str | None = None, rows: int = 4096,
                        context: int | None = None, batch: int = 8, skip_contexts: int | None = None,
                        device: str = "auto", run_dir: str | os.PathLike | None = None,
                        target_hook: str | None = None, progress: bool = False) -> dict:
    """`downstream_metrics` with defaults from the run's provenance (see `provenance`).

    `run_dir`, the directory the run was loaded from, helps find the harvest of a run that did not
    record its provenance.

    Without `skip_contexts`, evaluating on the corpus a harvest was cut from starts after the
    contexts it harvested, so the contexts are held out.

    Raises:
        ConfigError: the model or hook is neither given nor recorded by the run.
    """
    prov = provenance(getattr(sae, "run_config", None) or {}, run_dir)
    model, hook = model or prov.get("model"), hook or prov.get("hook")
    if not model or not hook:
        raise ConfigError("--model and --hook are needed: the run does not record which model and module "
                          "its activations came from")
    if not sae.is_sae:
        target_hook = target_hook or prov.get("target_hook")
        if not target_hook:
            raise ConfigError("--target-hook is needed: the run does not record which module's output "
                              "the transcoder replaces")
    elif target_hook:
        raise ConfigError("--target-hook is for transcoders; this model reconstructs its own input")
    context = context or prov.get("context") or 128
    if skip_contexts is None:
        same_text = prov.get("text") and Path(prov["text"]).resolve() == Path(text).resolve()
        skip_contexts = int(prov.get("next_context") or 0) if same_text else 0
    lm, tokenizer = A.load_lm(model, device=A.device_of(device))
    metrics = downstream_metrics(sae, lm, tokenizer, hook, text, rows=rows, context=context, batch=batch,
                                 keep_special=bool(prov.get("keep_special")), start_context=skip_contexts,
                                 target_hook=target_hook, progress=progress)
    return {"model": str(model), "hook": hook, **({"target_hook": target_hook} if target_hook else {}),
            "text": str(text), "context": context,
            "start_context": skip_contexts, **metrics}


def _batches(text, tokenizer, context: int, start: int, n: int, batch: int) -> Iterator[np.ndarray]:
    group = []
    for i, ctx in enumerate(iter_contexts(text, tokenizer, context, start=start)):
        if i >= n:
            break
        group.append(ctx)
        if len(group) == batch:
            yield np.stack(group)
            group = []
    if group:
        yield np.stack(group)


def _outputs(model, ids: Tensor, causal: bool) -> Tensor:
    """Next-token logits (causal LMs) or final hidden states (batch, seq, ·), float32."""
    if causal:
        return model(input_ids=ids).logits.float()
    out = model(input_ids=ids, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    return (hidden if hidden is not None else out.hidden_states[-1]).float()


class _Sums:
    """float64 running sums of every metric."""

    def __init__(self):
        self.contexts = self.positions = 0
        self.s: dict[str, float] = {}
        self.sum_x = 0.0  # (d_in,) float64 after the first batch

    def _add(self, **kw) -> None:
        for k, v in kw.items():
            self.s[k] = self.s.get(k, 0.0) + float(v)

    def add_hook(self, x: Tensor, x_hat: Tensor, codes: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self._add(sse=(x - x_hat).pow(2).sum(), sum_x2=x.pow(2).sum(), rows=x.shape[0], l0=(codes != 0).sum())
        self.sum_x = self.sum_x + x.sum(0)

    def add_lm(self, ids: Tensor, clean: Tensor, spliced: Tensor, zeroed: Tensor) -> None:
        target = ids[:, 1:].reshape(-1)
        logp = [F.log_softmax(t[:, :-1].reshape(-1, t.shape[-1]).double(), -1) for t in (clean, spliced, zeroed)]
        nll = [-lp.gather(1, target[:, None]).sum() for lp in logp]
        p_clean = logp[0].exp()
        kl = [(p_clean * (logp[0] - lp)).sum() for lp in logp[1:]]
        self._add(tokens=target.numel(), nll_clean=nll[0], nll_spliced=nll[1], nll_zero=nll[2],
                  kl_spliced=kl[0], kl_zero=kl[1])

    def add_encoder(self, clean: Tensor, spliced: Tensor, zeroed: Tensor) -> None:
        c = clean.double()
        pooled_c = c.mean(1)
        sums = {"tokens": c.shape[0] * c.shape[1]}
        for name, t in (("spliced", spliced.double()), ("zero", zeroed.double())):
            sums[f"cos_{name}"] = F.cosine_similarity(t, c, dim=-1).sum()
            sums[f"se_{name}"] = (t - c).pow(2).mean(-1).sum()
            sums[f"pooled_{name}"] = F.cosine_similarity(t.mean(1), pooled_c, dim=-1).sum()
        self._add(**sums)

    def result(self, causal: bool) -> dict:
        s = self.s
        n_rows = max(s["rows"], 1)
        var = s["sum_x2"] - float(torch.as_tensor(self.sum_x).pow(2).sum()) / n_rows
        out = {"kind": "causal-lm" if causal else "encoder", "contexts": self.contexts,
               "spliced_positions": self.positions,
               "hook_fvu": s["sse"] / max(var, 1e-30), "hook_l0": s["l0"] / n_rows}
        n = max(s["tokens"], 1)
        if causal:
            clean, spliced, zero = (s[f"nll_{k}"] / n for k in ("clean", "spliced", "zero"))
            gap = zero - clean
            out.update(loss_clean=clean, loss_spliced=spliced, loss_zero=zero,
                       loss_recovered=(zero - spliced) / gap if abs(gap) > 1e-12 else None,
                       kl_spliced=s["kl_spliced"] / n, kl_zero=s["kl_zero"] / n)
        else:
            out.update(hidden_cosine=s["cos_spliced"] / n, hidden_mse=s["se_spliced"] / n,
                       pooled_cosine=s["pooled_spliced"] / self.contexts,
                       hidden_cosine_zero=s["cos_zero"] / n, hidden_mse_zero=s["se_zero"] / n,
                       pooled_cosine_zero=s["pooled_zero"] / self.contexts)
        return out
