"""Any ``torch.nn.Module`` as a Pyro BNN: :func:`bayesian`.

The chosen parameters of the module become ``pyro.sample`` sites named like the
parameters (``"fc2.weight"``) with explicit priors; every other parameter (and buffer) is
held fixed at the module's values. The forward pass is ``torch.func.functional_call`` on a
private copy of the module in eval mode; S draws of the weights are evaluated with
``torch.func.vmap`` over the draw dim (in blocks that bound memory), falling back to a loop
over draws, with a log message, for modules that ``vmap`` cannot trace.

Priors are applied per *group*: the parameters of one submodule (``fc2.weight`` and
``fc2.bias``) share the submodule's fan-in (that of its first parameter with two or more
dims: ``prod(shape[1:])``, PyTorch's convention) and, for a
:class:`~marginalize.models.priors.Hierarchical` prior, one scale site ``"fc2.scale"``.

Examples
--------
>>> import torch, marginalize as mz
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
>>> model = mz.models.bayesian(net, prior=mz.priors.Normal(1.0), likelihood="gaussian",
...                            sites=["2.weight", "2.bias"])
>>> model.bayesian_sites
['2.weight', '2.bias']
>>> x = torch.randn(5, 3)
>>> p = model.module_params()
>>> bool(torch.allclose(model.forward(p, x)[:, 0], net(x)[:, 0]))
True
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from marginalize._validation import plain_number
from marginalize.errors import DataError, ModelError, is_out_of_memory
from marginalize.models.base import BNN, LayerSpec
from marginalize.models.likelihoods import Likelihood, get_likelihood
from marginalize.models.priors import Normal, Prior
from marginalize.models.usage import SiteUse, trace_usage

__all__ = ["ModuleBNN", "PriorGroup", "BatchStatistics", "bayesian"]

log = logging.getLogger(__name__)

#: bytes of activations one block of draws may use inside :meth:`ModuleBNN.forward`
BLOCK_BYTES = 128 * 2**20


@dataclass(frozen=True)
class PriorGroup:
    """Sites that share one prior application: a layer name (hyper sites are
    ``{layer}.scale``), the prior, the fan-in, and ``(site, shape)`` pairs."""

    layer: str
    prior: Prior
    fan_in: int
    sites: tuple[tuple[str, tuple[int, ...]], ...]


def _trailing(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    return scale.reshape(scale.shape + (1,) * ndim) if scale.dim() else scale


def _clean(name: str) -> str:
    return name.replace(".", "_")


class ModuleBNN(BNN):
    """A Pyro model made from an ``nn.Module`` with priors on some of its parameters.

    Build it with :func:`bayesian`. ``config()`` returns ``None``: a saved posterior of such
    a model is loaded with ``mz.load(path, model=bayesian(module, ...))`` (code and module
    weights are never stored in the file; the non-Bayesian parameters come from the module
    you pass, so pass the same one).
    """

    builder = "module"
    #: integer inputs (token ids for an ``nn.Embedding``) stay integers when the module takes
    #: them (see :meth:`check_input`)
    integer_inputs = True

    def __init__(
        self,
        module: nn.Module,
        sites: Mapping[str, Prior],
        likelihood: Likelihood,
        out_features: int | None = None,
    ):
        try:
            net = copy.deepcopy(module)
        except Exception as e:  # pragma: no cover - exotic modules
            raise ModelError(f"module: cannot be copied ({type(e).__name__}: {e})") from e
        net.eval()
        net.requires_grad_(False)
        self.module = net
        names = [n for n, _ in net.named_parameters()]
        order = {n: i for i, n in enumerate(names)}
        self.bayesian_sites = sorted(sites, key=order.__getitem__)
        super().__init__(likelihood, {n: sites[n] for n in self.bayesian_sites}, out_features)  # type: ignore[arg-type]
        shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
        self._shapes = shapes
        self._groups = self._make_groups(names, shapes)
        taken = set(names)
        for g in self._groups:
            for h in g.prior.hyper_sites(g.layer):
                if h in taken:
                    raise ModelError(
                        f"hyperparameter site {h!r} clashes with a module parameter name"
                    )
                taken.add(h)
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._norms = _stateful_norms(net, set(self.bayesian_sites))
        self._state_names = [
            f"{prefix}.{b}" if prefix else b for prefix, _ in self._norms for b in _STATE_BUFFERS
        ]
        self._units: dict[tuple, int] = {}
        self._vmap_ok = True
        self._usage: dict = {}
        self._example: torch.Tensor | None = None

    def _make_groups(
        self, names: list[str], shapes: dict[str, tuple[int, ...]]
    ) -> list[PriorGroup]:
        by_group: dict[str, list[str]] = {}
        for n in names:
            by_group.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
        groups = []
        for g, members in by_group.items():
            fan_in = next((math.prod(shapes[n][1:]) for n in members if len(shapes[n]) >= 2), 1)
            bayes = [n for n in members if n in self.priors]
            if not bayes:
                continue
            priors = [self.priors[n] for n in bayes]
            if all(p == priors[0] for p in priors):
                sites = tuple((n, shapes[n]) for n in bayes)
                groups.append(PriorGroup(g, priors[0], fan_in, sites))
            else:
                groups += [PriorGroup(n, self.priors[n], fan_in, ((n, shapes[n]),)) for n in bayes]
        return groups

    # ---- structure -----------------------------------------------------------------------
    def prior_groups(self) -> list[PriorGroup]:
        """How priors are applied (used by batched prior sampling)."""
        return list(self._groups)

    def layer_specs(self) -> list[LayerSpec]:
        """Groups made of a Bayesian ``weight`` (2+ dims, PyTorch layout ``(out, in, ...)``)
        and optional Bayesian ``bias``; other Bayesian parameters are listed by
        :meth:`prior_groups` only."""
        specs = []
        for g in self._groups:
            d = dict(g.sites)
            w, b = f"{g.layer}.weight", f"{g.layer}.bias"
            if w in d and len(d[w]) >= 2:
                specs.append(
                    LayerSpec(
                        g.layer,
                        d[w],
                        d.get(b),
                        g.fan_in,
                        self.site_dims()[w],
                        self.site_dims().get(b),
                        input_axis=1,
                    )
                )
        return specs

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims: dict[str, tuple[str, ...]] = {}
        for g in self._groups:
            for h in g.prior.hyper_sites(g.layer):
                dims[h] = ()
            d = dict(g.sites)
            for n, shape in g.sites:
                group = n.rsplit(".", 1)[0] if "." in n else n
                w = d.get(f"{group}.weight") or self._shapes.get(f"{group}.weight")
                stem = _clean(group)
                if n.endswith(".weight") and len(shape) == 2:
                    dims[n] = (f"{stem}_out", f"{stem}_in")
                elif n.endswith(".weight") and len(shape) == 4:
                    dims[n] = (f"{stem}_out", f"{stem}_in", f"{stem}_kh", f"{stem}_kw")
                elif n.endswith(".bias") and len(shape) == 1 and w and w[0] == shape[0]:
                    dims[n] = (f"{stem}_out",)
                else:
                    dims[n] = tuple(f"{_clean(n)}_dim_{i}" for i in range(len(shape)))
        for s in self.likelihood.latent_sites():
            dims[s] = ()
        return dims

    def site_usage(self, x: torch.Tensor | None = None) -> dict[str, SiteUse]:
        """How each Bayesian weight enters the module, traced on ``x`` (a few rows; default:
        the inputs last given to :meth:`check_input`). Weights the trace does not find keep
        PyTorch's layout (input units on axis 1, inputs not the data)."""
        x = self._example if x is None else x[:2]
        key = None if x is None else (tuple(x.shape[1:]), x.dtype)
        if key not in self._usage:
            found = trace_usage(self, x) if x is not None else {}
            for n in self.bayesian_sites:
                shape = self._shapes[n]
                if n not in found and len(shape) >= 2:
                    found[n] = SiteUse("weight", 1, math.prod(shape[1:]))
            self._usage[key] = found
        return self._usage[key]

    @staticmethod
    def _float(x: torch.Tensor) -> torch.dtype:
        """The dtype of the weights for inputs ``x`` (integer inputs, e.g. token ids for an
        ``nn.Embedding``, get the default float dtype)."""
        return x.dtype if torch.is_floating_point(x) else torch.get_default_dtype()

    def module_params(self, device=None, dtype=None) -> dict[str, torch.Tensor]:
        """The module's own values of the Bayesian sites (e.g. to check the forward)."""
        own = dict(self.module.named_parameters())
        return {n: own[n].detach().to(device=device, dtype=dtype) for n in self.bayesian_sites}

    # ---- Pyro model and log prior --------------------------------------------------------
    def sample_params(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        if not torch.is_floating_point(like):  # integer inputs: float weights
            like = like.new_zeros((), dtype=self._float(like))
        params: dict[str, torch.Tensor] = {}
        for g in self._groups:
            scale = g.prior.sample_scale(g.layer, g.fan_in, like)  # samples the hyper sites, if any
            for n, shape in g.sites:
                params[n] = pyro.sample(
                    n, dist.Normal(like.new_zeros(()), scale).expand(shape).to_event(len(shape))
                )
        params.update(self.likelihood.sample_params(like))
        return params

    def log_prior(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        lp = None
        batch: tuple[int, ...] = ()
        for g in self._groups:
            first, shape0 = g.sites[0]
            w0 = params[first]
            bnd = w0.dim() - len(shape0)
            batch = tuple(w0.shape[:bnd])
            term, scale = g.prior.hyper_log_prob(g.layer, params, g.fan_in, w0, bnd)
            for n, shape in g.sites:
                v = params[n]
                term = term + dist.Normal(0.0, _trailing(scale, len(shape))).log_prob(v).reshape(
                    *batch, -1
                ).sum(-1)
            lp = term if lp is None else lp + term
        assert lp is not None
        return lp + self.likelihood.log_prob_params(params, lp.new_zeros(batch))

    # ---- forward -------------------------------------------------------------------------
    def _fixed(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Non-Bayesian parameters and buffers on ``like``'s device (floats in its dtype)."""
        key = (like.device, like.dtype)
        if key not in self._cache:
            out = {}
            for n, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
                if n in self.priors:
                    continue
                t = t.detach()
                floating = t.is_floating_point()
                out[n] = t.to(like.device, like.dtype) if floating else t.to(like.device)
            self._cache[key] = out
        return self._cache[key]

    def _call(
        self, weights: Mapping[str, torch.Tensor], x: torch.Tensor, state=None
    ) -> torch.Tensor:
        like = next(iter(weights.values())) if weights else _float_like(x)
        tensors = {**self._fixed(like), **weights}
        if state is not None:
            tensors.update(state)
        out = torch.func.functional_call(self.module, tensors, (x,))
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"module: forward must return one tensor, got {type(out).__name__}")
        return out

    def units_per_input(self, x: torch.Tensor) -> int:
        """Activations one input makes in one pass (all submodule outputs), measured once."""
        key = tuple(x.shape[1:])
        if key not in self._units:
            total = [0]

            def hook(_m, _i, o):
                if isinstance(o, torch.Tensor):
                    total[0] += o.numel()

            handles = [m.register_forward_hook(hook) for m in self.module.modules()]
            try:
                with torch.no_grad():
                    self._call(self.module_params(x.device, _float_like(x).dtype), x[:1])
            finally:
                for h in handles:
                    h.remove()
            self._units[key] = max(1, total[0])
        return self._units[key]

    def forward(
        self, params: Mapping[str, torch.Tensor], x: torch.Tensor, state=None
    ) -> torch.Tensor:
        """``(*batch, N, outputs)`` for Bayesian weights with leading dims ``*batch``.

        ``state``: the running statistics of the network's BatchNorm layers (:attr:`stateful`),
        ``{buffer name: tensor}`` without leading dims (one state for every draw) or with the
        weights' leading dims (one per draw); ``None``: the module's own. The layers run in
        eval mode with these statistics. A :class:`BatchStatistics` instead runs them in train
        mode (statistics of the batch ``x``; the running statistics updated with the layers'
        momentum into the object, as ``torch.nn.BatchNorm`` does), which is how optimization
        methods train a network with BatchNorm."""
        weights = {n: params[n] for n in self.bayesian_sites}
        n0 = self.bayesian_sites[0]
        batch = tuple(weights[n0].shape[: weights[n0].dim() - len(self._shapes[n0])])
        training = isinstance(state, BatchStatistics)
        if training and not self._norms:
            state, training = None, False
        running = state.start(self._state_names) if training else state
        per_draw = running is not None and _has_batch(running, self._state_shapes(), batch)
        if not batch:
            with self._norms_training(training):
                out = self._call(weights, x, running)
            if training:
                state.finish(running)
            return self._as_outputs(out, 0)
        s = math.prod(batch)
        flat = {k: v.reshape(s, *self._shapes[k]) for k, v in weights.items()}
        if training:  # one copy of the running statistics per draw (vmap updates them in place)
            running = {k: _repeat(v, s) for k, v in running.items()}
            per_draw = True
        elif per_draw:
            shapes = self._state_shapes()
            running = {k: v.reshape((s,) + shapes[k]) for k, v in running.items()}
        block = max(1, BLOCK_BYTES // (3 * x.shape[0] * self.activation_bytes_per_input(x)))
        outs = []
        with self._norms_training(training):
            for i in range(0, s, block):
                w = {k: v[i : i + block] for k, v in flat.items()}
                st = {k: v[i : i + block] for k, v in running.items()} if per_draw else running
                outs.append(self._batched(w, x, st, per_draw))  # updates the views in place
        if training:  # the draws' updates averaged (integer counters: the first draw's)
            state.finish(
                {k: v.mean(0) if v.is_floating_point() else v[0] for k, v in running.items()}
            )
        out = self._as_outputs(torch.cat(outs), 1)
        return out.reshape(*batch, *out.shape[1:])

    def _batched(self, weights, x, state=None, per_draw: bool = False) -> torch.Tensor:
        if self._vmap_ok:
            try:
                if per_draw:
                    return torch.func.vmap(lambda w, st: self._call(w, x, st))(
                        dict(weights), dict(state)
                    )
                return torch.func.vmap(lambda w: self._call(w, x, state))(dict(weights))
            except (RuntimeError, NotImplementedError, ValueError) as e:
                if is_out_of_memory(e):
                    raise
                self._vmap_ok = False
                log.info(
                    "module cannot be vmapped over draws (%s: %s); using a loop over draws",
                    type(e).__name__,
                    e,
                )
        s = next(iter(weights.values())).shape[0]
        outs = []
        for i in range(s):
            st = state
            if per_draw:
                st = {k: v[i].clone() for k, v in state.items()}
            outs.append(self._call({k: v[i] for k, v in weights.items()}, x, st))
            if per_draw:  # the loop's in-place updates land in the per-draw copies
                for k, v in st.items():
                    state[k][i] = v
        return torch.stack(outs)

    # ---- BatchNorm: running statistics as state ---------------------------------------------
    @property
    def stateful(self) -> bool:
        """Whether the module has BatchNorm layers whose running statistics belong to the
        weights: those with ``track_running_stats`` whose weight or bias is a Bayesian site
        (or that have no affine parameters). Layers whose parameters are all held fixed keep
        the module's statistics (they are part of the fixed network)."""
        return bool(self._norms)

    @property
    def state_names(self) -> list[str]:
        """Names of the buffers that make the state (``running_mean``, ``running_var`` and
        ``num_batches_tracked`` of each stateful BatchNorm layer)."""
        return list(self._state_names)

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        own = dict(self.module.named_buffers())
        return {k: tuple(own[k].shape) for k in self._state_names}

    def module_state(self, device=None, dtype=None) -> dict[str, torch.Tensor] | None:
        """The module's own running statistics (copies; floats in ``dtype``), or ``None`` for
        a module without stateful BatchNorm layers."""
        if not self._norms:
            return None
        return _state_of(self.module, self._state_names, device, dtype)

    @contextlib.contextmanager
    def _norms_training(self, on: bool):
        """The stateful BatchNorm layers in train mode inside (the module stays in eval mode
        otherwise: dropout layers are not switched on)."""
        if not on:
            yield
            return
        try:
            for _, m in self._norms:
                m.train()
            yield
        finally:
            for _, m in self._norms:
                m.eval()

    def state_from_data(self, params, inputs) -> dict[str, torch.Tensor] | None:
        """Running statistics of the stateful BatchNorm layers for weights ``params`` (leading
        dims ``*batch``), recomputed by one pass over ``inputs`` (an iterable of input chunks
        ``(B, ...)``, or of ``(x, y)`` pairs): each layer in train mode, its running mean and
        variance the average of the chunks' batch statistics weighted by their rows (the
        ``bn_update`` of the SWAG reference code; equal to ``torch.nn.BatchNorm`` with
        ``momentum=None`` when the chunks have equal sizes). A chunk is split further where
        the draws' activations would exceed ``BLOCK_BYTES``; a chunk of one row is skipped
        (a batch statistic needs two rows). Memory is that of one chunk of rows for a block
        of draws, whatever the number of inputs. Tensors with the leading dims ``*batch``;
        ``None`` for a module without stateful BatchNorm layers.

        Raises
        ------
        DataError
            ``inputs`` hold no chunk of at least two rows.
        """
        if not self._norms:
            return None
        weights = {n: params[n] for n in self.bayesian_sites}
        n0 = self.bayesian_sites[0]
        batch = tuple(weights[n0].shape[: weights[n0].dim() - len(self._shapes[n0])])
        s = math.prod(batch)
        flat = {k: v.reshape(s, *self._shapes[k]) for k, v in weights.items()}
        like = flat[n0]
        zero = self.module_state(like.device, like.dtype)
        running = {k: _repeat(v, s) for k, v in zero.items()}
        for k, v in running.items():
            if k.endswith("num_batches_tracked"):
                v.zero_()
        seen = 0
        with torch.no_grad(), self._norms_training(True):
            for x in _split_rows(inputs, self, s):
                if x.shape[0] < 2:
                    continue
                self._accumulate(flat, running, x.to(like.device), seen)
                seen += x.shape[0]
        if not seen:
            raise DataError(
                "BatchNorm statistics: the inputs hold no chunk of at least two rows (a batch "
                "statistic needs two)"
            )
        shapes = self._state_shapes()
        return {k: v.reshape(batch + shapes[k]) for k, v in running.items()}

    def _accumulate(self, flat, running, x, seen: int) -> None:
        b = x.shape[0]
        saved = [m.momentum for _, m in self._norms]
        try:
            for _, m in self._norms:
                m.momentum = b / (seen + b)
            s = next(iter(flat.values())).shape[0]
            block = max(1, BLOCK_BYTES // (3 * b * self.activation_bytes_per_input(x)))
            for i in range(0, s, block):
                w = {k: v[i : i + block] for k, v in flat.items()}
                st = {k: v[i : i + block] for k, v in running.items()}
                self._batched(w, x, st, True)  # updates the views of ``running`` in place
        finally:
            for (_, m), mom in zip(self._norms, saved, strict=True):
                m.momentum = mom

    def probe_params(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.module_params(like.device, like.dtype)

    def activation_bytes_per_input(self, x: torch.Tensor) -> int:
        """As :meth:`BNN.activation_bytes_per_input`; the probe runs every layer in eval mode
        (it never touches running statistics)."""
        modes = [m.training for _, m in self._norms]
        try:
            for _, m in self._norms:
                m.eval()
            return super().activation_bytes_per_input(x)
        finally:
            for (_, m), mode in zip(self._norms, modes, strict=True):
                m.train(mode)

    def reset_values(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """A fresh PyTorch initialization of the module (every submodule's
        ``reset_parameters()``, drawn from torch's global RNG): ``(Bayesian site values,
        running statistics)``. The module itself is not changed."""
        fresh = copy.deepcopy(self.module)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
        own = dict(fresh.named_parameters())
        values = {n: own[n].detach().clone() for n in self.bayesian_sites}
        state = _state_of(fresh, self._state_names) if self._norms else None
        return values, state

    def values_of(
        self, module: nn.Module | Mapping[str, torch.Tensor], what: str = "members"
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """``(Bayesian site values, running statistics)`` of another network of the same
        architecture (an ``nn.Module`` or its ``state_dict()``). Its parameters that are not
        Bayesian sites must equal this model's (they are part of the fixed network).

        Raises
        ------
        ModelError
            A missing or differently shaped parameter, or a differing fixed parameter.
        """
        if isinstance(module, nn.Module):
            tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        elif isinstance(module, Mapping):
            tensors = dict(module)
        else:
            raise ModelError(
                f"{what}: expected nn.Modules or state dicts, got {type(module).__name__}"
            )
        params = dict(self.module.named_parameters())
        own = {**params, **dict(self.module.named_buffers())}
        for name, t in own.items():
            got = tensors.get(name)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(t.shape):
                shape = None if not isinstance(got, torch.Tensor) else tuple(got.shape)
                raise ModelError(
                    f"{what}: {name!r} is missing or shaped {shape}, the model's is "
                    f"{tuple(t.shape)}: pass networks of the model's architecture"
                )
            if name in params and name not in self.priors:
                if not torch.equal(got.detach().to(t.device, t.dtype), t):
                    raise ModelError(
                        f"{what}: the fixed (non-Bayesian) parameter {name!r} differs from the "
                        "model's; a posterior holds one fixed network: make it a Bayesian site "
                        "(sites=...) or pass networks that share it"
                    )
        values = {n: tensors[n].detach().clone() for n in self.bayesian_sites}
        state = {k: tensors[k].detach().clone() for k in self._state_names} or None
        return values, state

    @staticmethod
    def _as_outputs(out: torch.Tensor, batch_ndim: int) -> torch.Tensor:
        if out.dim() == batch_ndim + 1:
            return out.unsqueeze(-1)
        if out.dim() != batch_ndim + 2:
            raise ModelError(
                "module: forward must return (N,) or (N, outputs), got "
                f"{tuple(out.shape[batch_ndim:])}"
            )
        return out

    def check_input(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """Run the module once on ``x[:2]``; infer/check the number of outputs.

        Integer inputs stay integers when the module takes them (token ids for an
        ``nn.Embedding``); otherwise they become the default float dtype, as for every model.
        """
        dtype = _float_like(x).dtype
        try:
            with torch.no_grad():
                out = self._call(self.module_params(x.device, dtype), x[:2])
        except ModelError:
            raise
        except Exception as e:
            if not x.is_floating_point():  # a module of floats given integers: cast, as before
                return self.check_input(x.to(dtype), name)
            raise DataError(
                f"{name}: the module fails on inputs of shape {tuple(x.shape)} "
                f"({type(e).__name__}: {e})"
            ) from e
        k = self._as_outputs(out, 0).shape[-1]
        self._example = x[:2].detach()
        lik = self.likelihood
        targets = {"heteroscedastic": k // 2, "bernoulli": 1}.get(lik.kind, k)
        if lik.net_outputs(targets) != k:
            raise ModelError(
                f"module: returns {k} outputs; a {lik.kind} likelihood needs "
                f"{lik.net_outputs(targets)}"
            )
        if self.out_features is None:
            self.out_features = targets
        elif self.out_features != targets:
            raise ModelError(f"module: returns {k} outputs but out_features={self.out_features}")
        if lik.kind == "categorical":
            if lik.num_classes is None:
                lik.num_classes = targets
            elif lik.num_classes != targets:
                raise ModelError(
                    f"module: returns {k} logits but the likelihood has {lik.num_classes} classes"
                )
        return x

    def config(self) -> None:
        """``None``: the model needs its module; load with ``mz.load(path, model=...)``."""
        return None

    def __repr__(self) -> str:
        return (
            f"bayesian({type(self.module).__name__}, sites={len(self.bayesian_sites)} of "
            f"{len(self._shapes)} parameters, {self.likelihood!r})"
        )


def _float_like(x: torch.Tensor) -> torch.Tensor:
    """``x``, or for integer inputs a float scalar of the default dtype (the weights' dtype)."""
    return x if x.is_floating_point() else x.new_zeros((), dtype=torch.get_default_dtype())


def _resolve_sites(module: nn.Module, sites, prior: Prior) -> dict[str, Prior]:
    names = [n for n, _ in module.named_parameters()]
    if not names:
        raise ModelError("module: has no parameters to make Bayesian")
    if sites is None:
        return {n: prior for n in names}
    if isinstance(sites, str):
        sites = [sites]
    if isinstance(sites, Mapping):
        items = list(sites.items())
    elif isinstance(sites, Sequence):
        items = [(s, None) for s in sites]
    else:
        raise ModelError(
            f"sites: expected None, a list of parameter names or a mapping of name "
            f"to Prior, got {type(sites).__name__}"
        )
    out: dict[str, Prior] = {}
    # submodule names first, so that an exact parameter name given as well wins
    items.sort(key=lambda kv: kv[0] in names)
    for key, p in items:
        if not isinstance(key, str):
            raise ModelError(f"sites: names must be strings, got {key!r}")
        p = prior if p is None else p
        if not isinstance(p, Prior):
            raise ModelError(
                f"sites[{key!r}]: expected a marginalize Prior, got {type(p).__name__}"
            )
        matched = [n for n in names if n == key or n.startswith(key + ".")]
        if not matched:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModelError(
                f"sites: {key!r} names no parameter or submodule of the module{hint}; "
                f"parameters are {names}"
            )
        for n in matched:
            out[n] = p
    return out


def bayesian(
    module: nn.Module,
    prior: Prior | None = None,
    likelihood: str | Likelihood = "gaussian",
    sites: Sequence[str] | Mapping[str, Prior | None] | None = None,
    *,
    out_features: int | None = None,
) -> ModuleBNN:
    """Turn an existing ``nn.Module`` into a Pyro BNN with explicit priors on its parameters.

    Parameters
    ----------
    module : torch.nn.Module
        Maps inputs ``(N, ...)`` to outputs ``(N,)`` or ``(N, outputs)`` (logits for
        classification). It is copied (in eval mode); later changes to it have no effect.
    prior : Prior, optional
        Prior for the Bayesian parameters not given one in ``sites`` (default ``Normal(1.0)``).
    likelihood : str or Likelihood
        As for :func:`~marginalize.models.mlp`.
    sites : None, list of names, or mapping of name to Prior
        Which parameters are Bayesian (names from ``module.named_parameters()``, or a
        submodule name for all of its parameters). None: all of them. The others stay fixed
        at the module's values.
    out_features : int, optional
        Number of targets/classes; inferred from the module's output on first use.

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> m = mz.models.bayesian(net, likelihood="categorical",
    ...                        sites={"2": mz.priors.Normal(1.0)})   # last layer only
    >>> m.bayesian_sites
    ['2.weight', '2.bias']
    """
    if not isinstance(module, nn.Module):
        raise ModelError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    prior = Normal(1.0) if prior is None else prior
    if not isinstance(prior, Prior):
        raise ModelError(f"prior: expected a marginalize Prior, got {type(prior).__name__}")
    lik = get_likelihood(likelihood)
    out_features = plain_number(out_features)
    bad = isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1
    if out_features is not None and bad:
        raise ModelError(f"out_features: expected a positive int, got {out_features!r}")
    return ModuleBNN(module, _resolve_sites(module, sites, prior), lik, out_features)


#: the buffers of a BatchNorm layer that make its state
_STATE_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _stateful_norms(net: nn.Module, bayes: set[str]) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the BatchNorm layers whose running statistics are state: tracking
    statistics, and with a Bayesian weight or bias (or no affine parameters)."""
    out = []
    for name, m in net.named_modules():
        # torch has no public base class of the BatchNorm and InstanceNorm layers
        if not isinstance(m, nn.modules.batchnorm._NormBase) or not m.track_running_stats:  # noqa: SLF001
            continue
        if m.running_mean is None:
            continue
        own = [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)]
        if not own or any(p in bayes for p in own):
            out.append((name, m))
    return out


def _state_of(net: nn.Module, names, device=None, dtype=None) -> dict[str, torch.Tensor]:
    own = dict(net.named_buffers())
    out = {}
    for k in names:
        t = own[k].detach()
        moved = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)
        out[k] = moved.clone()
    return out


def _repeat(t: torch.Tensor, s: int) -> torch.Tensor:
    """``s`` stacked copies of ``t`` (a fresh tensor with its own storage per copy)."""
    return t.unsqueeze(0).repeat(s, *([1] * t.dim()))


def _has_batch(state, shapes, batch) -> bool:
    """Whether ``state`` carries the weights' leading dims ``batch`` (one state per draw)."""
    if not batch:
        return False
    for k, v in state.items():
        if k in shapes:
            return tuple(v.shape) == tuple(batch) + tuple(shapes[k])
    return False


def _split_rows(inputs, model: ModuleBNN, draws: int):
    """The chunks of ``inputs``, each split where ``draws`` draws of it would exceed
    ``BLOCK_BYTES`` of activations."""
    for x in inputs:
        if isinstance(x, (tuple, list)):
            x = x[0]
        per = 3 * model.activation_bytes_per_input(x) * max(1, draws)
        rows = max(2, BLOCK_BYTES // per)
        for i in range(0, x.shape[0], rows):
            yield x[i : i + rows]


class BatchStatistics:
    """Train-mode BatchNorm for :meth:`ModuleBNN.forward` (what optimization methods train
    with): the layers normalize by the statistics of the batch, and each forward updates a
    copy of the running statistics ``running`` with the layers' momentum (as
    ``torch.nn.BatchNorm`` in train mode). The updated copy waits in ``last`` until
    :meth:`commit` makes it the running statistics (the training loop commits after a step it
    keeps, so a step it undoes leaves them as they were).

    Parameters
    ----------
    running : dict of str to Tensor
        The running statistics to start from (e.g. ``ModuleBNN.module_state()``).
    """

    def __init__(self, running: Mapping[str, torch.Tensor]):
        self.running = {k: v.clone() for k, v in running.items()}
        self.last: dict[str, torch.Tensor] | None = None

    def start(self, names) -> dict[str, torch.Tensor]:
        return {k: self.running[k].clone() for k in names}

    def finish(self, updated: Mapping[str, torch.Tensor]) -> None:
        self.last = {k: v.detach() for k, v in updated.items()}

    def commit(self) -> None:
        """Keep the update of the last forward."""
        if self.last is not None:
            self.running = self.last
            self.last = None
