"""The one result type of every method: :class:`Posterior`, a record of a fit.

A ``Posterior`` holds what a fit produced (the model, the layout of its latent sites, the
approximation, the method's name, options and :class:`~marginalize.core.info.FitInfo`, the
training data source, the seed and any fitted network state) and hands every computation
over inputs to its :attr:`Posterior.predictive`, a
:class:`~marginalize.core.predictive.Predictive` (chunked, batched prediction, mixtures,
log-likelihoods, the linearized predictive of Laplace).

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.randn(40, 1); y = 2 * x[:, 0] + 0.1 * torch.randn(40)
>>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="map", steps=200, progress=False)
>>> pred = post.predict(x[:5])
>>> pred.mean.shape, pred.std.shape
(torch.Size([5]), torch.Size([5]))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import torch

from marginalize._files import check_save_path, write_verified
from marginalize.core.approximations import Approximation
from marginalize.core.data import ArrayData, DataSource
from marginalize.core.info import FitInfo
from marginalize.core.layout import Layout
from marginalize.core.predictive import Prediction, Predictive
from marginalize.core.problem import UserModel
from marginalize.errors import OptionError
from marginalize.models.base import BNN

__all__ = ["Posterior", "Prediction", "save_posterior", "FORMAT", "VERSION", "SAVE_NAME"]


class Posterior:
    """Draws of a model's latent sites, from any method, and what follows from them.

    Attributes
    ----------
    model : callable
        The Pyro model (a builder model or a plain function).
    method : str
        The registry name of the method that produced it.
    approximation : Approximation
        The distribution over the flat unconstrained parameter vector.
    layout : Layout
        Sites, shapes and transforms of that vector.
    task : str
        ``"regression"`` or ``"classification"``.
    info : FitInfo
        What the fit reports about itself: ``loss``, ``converged``, ``stopped`` (optimization),
        ``sample_stats`` (MCMC, ``(chain, draw)`` tensors), ``predictive``, ``temperature``...
    data : (x, y) or DataSource or None
        The training data (None for a posterior loaded from a file saved without it).
    state : dict or None
        The network's fitted weight-dependent state (BatchNorm statistics), if any.
    predictive : Predictive
        Every computation over inputs (built on first use from the fields above; the
        fields are read once, so a Posterior is not modified after it is made).
    """

    def __init__(
        self,
        model: Callable,
        layout: Layout,
        approximation: Approximation,
        *,
        method: str,
        task: str,
        options: dict | None = None,
        info: FitInfo | dict | None = None,
        seed: int | None = None,
        data: tuple[torch.Tensor, torch.Tensor] | DataSource | None = None,
        num_classes: int | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
        example: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.model = model
        self.layout = layout
        self.approximation = approximation
        self.method = method
        self.task = task
        self.options = dict(options or {})
        self.info = info if isinstance(info, FitInfo) else FitInfo.from_dict(info)
        self.seed = seed
        self.data = data
        self.num_classes = num_classes
        self.state = None if state is None else dict(state)
        #: a few rows standing in for the training data where only shapes matter (a
        #: posterior loaded from a file saved without its data)
        self.example = example

    def replace(self, **changes: Any) -> Posterior:
        """A copy with some fields changed (``info``, ``data``, ``state``...): a new record,
        whose predictive is built afresh.

        >>> import torch, marginalize as mz
        >>> x = torch.randn(20, 1); y = x[:, 0]
        >>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="map", steps=20,
        ...               progress=False)
        >>> post.replace(data=None).data is None, post.data is not None
        (True, True)
        """
        fields = {
            "model": self.model,
            "layout": self.layout,
            "approximation": self.approximation,
            "method": self.method,
            "task": self.task,
            "options": self.options,
            "info": self.info,
            "seed": self.seed,
            "data": self.data,
            "num_classes": self.num_classes,
            "state": self.state,
            "example": self.example,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise OptionError(f"replace: unknown fields {sorted(unknown)}; known: {sorted(fields)}")
        fields.update(changes)
        model, layout, approx = (
            fields.pop("model"),
            fields.pop("layout"),
            fields.pop("approximation"),
        )
        return Posterior(model, layout, approx, **fields)

    @cached_property
    def predictive(self) -> Predictive:
        """The posterior predictive of this fit (see :class:`~marginalize.core.predictive.
        Predictive`)."""
        return Predictive(
            self.model,
            self.layout,
            self.approximation,
            task=self.task,
            num_classes=self.num_classes,
            temperature=self.info.temperature,
            linearized=self.info.get("predictive") == "glm",
            link_approx=self.info.get("link_approx", "probit"),
            data=self.data,
            example=self.example,
            seed=self.seed,
            state=self.state,
        )

    # ---- draws -------------------------------------------------------------------------
    @property
    def num_chains(self) -> int:
        return self.approximation.num_chains

    @property
    def device(self) -> torch.device:
        return self.predictive.device

    @property
    def dtype(self) -> torch.dtype:
        return self.predictive.dtype

    @property
    def data_source(self) -> DataSource | None:
        """The training data as a :class:`~marginalize.core.data.DataSource` (or None)."""
        return self.predictive.data

    def sample_flat(self, num_samples: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Unconstrained draws ``(chain, draw, D)``."""
        return self.predictive.sample_flat(num_samples, seed)

    def sample(
        self, num_samples: int | None = None, seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Constrained draws of every latent site, ``(chain, draw, *site_shape)``, and of the
        model's ``pyro.deterministic`` sites (model functions; evaluated at the training
        data, one model trace per draw)."""
        z = self.sample_flat(num_samples, seed)
        out = self.layout.unpack(z)
        out.update(self.predictive.deterministic_draws(z))
        return out

    @property
    def deterministic_sites(self) -> tuple[str, ...]:
        """Names of the model's ``pyro.deterministic`` sites (model functions only)."""
        return self.predictive.deterministic_sites

    # ---- evaluation (the predictive's) -----------------------------------------------------
    def predict(
        self,
        x,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        return_draws: bool = False,
        bn_update: str | bool = "auto",
    ) -> Prediction:
        """Posterior predictive summaries at ``x`` (arrays or a data loader), over
        ``num_samples`` draws: see :meth:`marginalize.core.predictive.Predictive.predict`.

        Draws are evaluated in chunks of ``chunk_size`` draws (by default sized from the
        activation memory of one input, with the inputs taken in blocks that bound memory);
        builder models evaluate each chunk in one batched pass. A Laplace posterior with the
        closed-form GLM predictive (``link_approx="probit"``) draws nothing unless
        ``return_draws`` is set.
        """
        return self.predictive.predict(
            x,
            num_samples,
            seed=seed,
            chunk_size=chunk_size,
            return_draws=return_draws,
            bn_update=bn_update,
        )

    def predictive_mixture(
        self,
        x,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        bn_update: str | bool = "auto",
    ):
        """The posterior predictive at ``x`` as a mixture over draws (regression): the same
        draws as :meth:`predict` with the same ``num_samples`` and ``seed``."""
        return self.predictive.predictive_mixture(
            x, num_samples, seed=seed, chunk_size=chunk_size, bn_update=bn_update
        )

    def log_likelihood(
        self,
        x,
        y=None,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        bn_update: str | bool = "auto",
    ) -> torch.Tensor:
        """Per-draw, per-observation ``log p(y_n | x_n, w)``, shaped ``(chain, draw, N)``
        (``x`` may be a data loader of ``(x, y)`` batches, ``y`` then None)."""
        return self.predictive.log_likelihood(
            x, y, num_samples, seed=seed, chunk_size=chunk_size, bn_update=bn_update
        )

    def log_predictive(
        self,
        x,
        y=None,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        bn_update: str | bool = "auto",
    ) -> torch.Tensor:
        """Log posterior predictive density per observation, ``log mean_s p(y_n | x_n, w_s)``
        (in closed form for a Laplace posterior with ``link_approx="probit"``)."""
        return self.predictive.log_predictive(
            x, y, num_samples, seed=seed, chunk_size=chunk_size, bn_update=bn_update
        )

    # ---- persistence -------------------------------------------------------------------
    def save(self, path, *, include_data: bool = False) -> None:
        """Save to ``path`` as plain tensors (``torch.load(weights_only=True)`` reads it back).

        A folder (an existing one, or a path ending in a separator, created if only its last
        level is missing) gets the file ``posterior.pt`` inside; :func:`marginalize.load` of
        that folder reads it. A missing folder, an empty path or a path where a non-regular
        file exists raise ``OSError`` subclasses naming the problem, before anything is written
        (see ``docs/input_checks.md``).

        The training data are not written unless ``include_data=True`` (in-memory data only):
        the file keeps two summary rows (per-position medians of ``x`` and ``y``, no training
        row) from which the model's trace is rebuilt on load. A posterior loaded without data
        predicts as before; what needs the training data (a stateful network's BatchNorm
        update, the training groups of ``to_arviz``, PSIS k-hat, the linearized predictive of a
        plain model function) asks for it: ``mz.load(path, data=(x, y))``.
        """
        save_posterior(self, path, include_data=include_data)

    def to_arviz(self, **kwargs: Any):
        """ArviZ data of this fit (see :func:`marginalize.core.arviz.to_inference_data` for the
        arguments: ``x_test``, ``y_test``, ``num_samples``, ``function_inputs``,
        ``prior_samples``, ``feature_names``, ``seed``...)."""
        from marginalize.core.arviz import to_inference_data

        return to_inference_data(self.predictive, method=self.method, info=self.info, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Posterior(method={self.method!r}, task={self.task!r}, "
            f"chains={self.num_chains}, params={self.layout.size})"
        )


FORMAT = "marginalize.posterior"
#: the file name of a posterior saved to (or loaded from) a folder
SAVE_NAME = "posterior.pt"
#: 2: a SHA-256 of the content is stored beside it (the training data optional, an example
#: of the inputs and the network's state beside them)
VERSION = 2


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_cpu(v) for v in obj]
    return obj


def _plain(obj):
    """Keep tensors and JSON-able values; drop what cannot be stored safely."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def _summary_rows(t: torch.Tensor) -> torch.Tensor:
    """Two rows that stand for ``t`` ``(N, ...)`` without being any of its rows: the lower
    median at every position (a value observed there, so within the data's support); for
    one-hot rows (one-hot targets), the most frequent class."""
    t = t.detach().cpu()
    one_hot = t.dim() == 2 and bool(((t == 0) | (t == 1)).all()) and bool((t.sum(1) == 1).all())
    if one_hot:
        row = torch.zeros_like(t[0])
        row[t.sum(0).argmax()] = 1
    else:
        row = t.median(0).values
    return row.unsqueeze(0).expand(2, *row.shape).clone()


def _example(post: Posterior) -> dict[str, torch.Tensor] | None:
    src = post.data_source
    if src is None:
        ex = post.example
        return None if ex is None else {"x": ex[0].cpu(), "y": ex[1].cpu()}
    if isinstance(src, ArrayData):
        x, y = src.x, src.y
    else:  # a data loader: the summary of its first batches
        x, y = src.example(256)
    if y is None:
        return None
    return {"x": _summary_rows(x), "y": _summary_rows(y)}


def save_posterior(post: Posterior, path, *, include_data: bool = False) -> None:
    """Write ``post`` to ``path`` (atomically: a temporary file is renamed into place)."""
    if not isinstance(include_data, bool):
        raise OptionError(f"include_data: expected True or False, got {include_data!r}")
    # checked before any work; a folder (or a path ending in a separator) gets SAVE_NAME inside
    path = check_save_path(path, default_name=SAVE_NAME)
    src = post.data_source
    if include_data and not isinstance(src, ArrayData):
        raise OptionError(
            "include_data=True: the posterior holds no in-memory training data to write "
            "(a data loader is not written into a file)"
        )
    # builder models store their config; plain functions and bayesian(module) models (config()
    # is None) must be passed to load(path, model=...)
    cfg = post.model.config() if isinstance(post.model, BNN) else None
    model_cfg = json.dumps(cfg) if cfg is not None else None
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        "method": post.method,
        "task": post.task,
        "seed": post.seed,
        "num_classes": post.num_classes,
        "options": json.dumps(_plain(post.options)),
        "layout": json.dumps(post.layout.describe()),
        "obs_site": post.model.obs_site if isinstance(post.model, UserModel) else None,
        "model_config": model_cfg,
        "approximation": _to_cpu(post.approximation.state_dict()),
        "info": _plain(post.info.to_dict()),
        "data": {"x": src.x.cpu(), "y": src.y.cpu()} if include_data else None,
        "example": _example(post),
        "state": None if post.state is None else _to_cpu(dict(post.state)),
        "dtype": str(post.dtype).replace("torch.", ""),
    }
    write_verified(payload, path)
