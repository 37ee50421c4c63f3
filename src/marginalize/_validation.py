"""Input checks at the public API boundary (the error types are in :mod:`marginalize.errors`).

Every check names the argument and says what was expected. Errors are subclasses of
``ValueError``/``TypeError`` so generic handlers keep working.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from marginalize.errors import DataError, OptionError

__all__ = [
    "as_tensor",
    "check_finite",
    "check_options",
    "check_seed",
    "check_device",
    "check_positive_int",
    "check_option_values",
    "check_count",
    "check_probability",
    "plain_number",
    "plain_ints",
    "MAX_COUNT",
]


#: largest count (steps, draws, members, ...) an option may ask for: exactly representable in
#: the float64 arithmetic of schedules and in the int64 tensors of checkpoints
MAX_COUNT = 2**53


def _sparse_kind(value: Any) -> str | None:
    """The name of a sparse container (torch sparse layouts, SciPy sparse arrays), else None."""
    if isinstance(value, torch.Tensor):
        return None if value.layout == torch.strided else f"sparse tensor ({value.layout})"
    mod = type(value).__module__ or ""
    if mod.startswith("scipy.sparse"):
        return f"SciPy sparse {type(value).__name__}"
    if mod.startswith("pandas") and hasattr(value, "sparse"):
        try:
            value.sparse  # noqa: B018 - raises unless the frame/series has sparse columns
        except (AttributeError, TypeError, ValueError):
            return None
        return "pandas sparse frame"
    return None


def _from_pandas(name: str, value: Any) -> np.ndarray:
    """A DataFrame/Series as a fresh NumPy array; nullable columns with missing values as NaN."""
    arr = value.to_numpy()
    if arr.dtype == object:
        try:  # nullable extension dtypes (Int64, Float64, boolean) hold pd.NA
            arr = value.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError):
            kinds = list(value.dtypes) if getattr(value, "ndim", 1) == 2 else [value.dtype]
            raise DataError(
                f"{name}: a pandas object with non-numeric columns (dtypes "
                f"{sorted({str(d) for d in kinds})}); encode them as numbers first"
            ) from None
    return arr


def _to_numpy(name: str, value: Any) -> np.ndarray:
    """Array-likes (lists, NumPy, pandas, masked arrays) as a NumPy array torch can take."""
    if isinstance(value, np.ma.MaskedArray):
        masked = int(np.ma.count_masked(value))
        if masked:
            raise DataError(
                f"{name}: is a NumPy masked array with {masked} masked value(s), and "
                "marginalize does not impute: drop the rows that hold them "
                f"(np.ma.getmaskarray({name}) marks them) or fill them ({name}.filled(value)) "
                "first"
            )
        value = np.ma.getdata(value)
    if type(value).__module__.startswith("pandas") and hasattr(value, "to_numpy"):
        arr = _from_pandas(name, value)
    else:
        try:
            arr = np.asarray(value)
        except Exception as e:
            raise DataError(f"{name}: cannot be converted to an array ({e})") from e
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise DataError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(f"{name}: complex values are not supported")
    if np.issubdtype(arr.dtype, np.floating) and arr.dtype.itemsize > 8:  # long double
        arr = arr.astype(np.float64)  # becomes the default float dtype below, like float64
    elif arr.dtype in (np.uint16, np.uint32, np.uint64):  # torch's unsigned types do little
        if arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{name}: integer values beyond the int64 range")
        arr = arr.astype(np.int64)
    if not arr.flags.writeable:  # read-only views (pandas >= 3, np.broadcast_to): own a copy
        arr = arr.copy()
    return arr


def as_tensor(
    name: str, value: Any, *, device=None, dtype=None, allow_int: bool = True
) -> torch.Tensor:
    """Convert arrays/lists to a tensor, keeping torch tensors' dtype and device unless asked.

    NumPy floating arrays become the torch default dtype (float32 unless changed); long double
    first becomes float64. pandas objects, read-only arrays and masked arrays without a masked
    value are accepted and give what the same values as a plain NumPy array give.

    Raises
    ------
    DataError
        None, non-numeric or complex values, masked values, sparse containers, tensors without
        data (meta device), quantized or nested tensors.
    """
    if value is None:
        raise DataError(f"{name}: expected a numeric array, got None")
    sparse = _sparse_kind(value)
    if sparse is not None:
        raise DataError(
            f"{name}: is a {sparse}; pass a dense array ({name}.to_dense(), {name}.toarray() "
            f"or {name}.sparse.to_dense())"
        )
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise DataError(
                f"{name}: is on the 'meta' device (a shape without data); pass a tensor with values"
            )
        if value.is_quantized or value.is_nested:
            raise DataError(f"{name}: quantized and nested tensors are not supported")
        t = value.detach()
        if t.is_inference():  # made under torch.inference_mode(): a fit needs autograd on it
            with torch.inference_mode(False):
                t = t.clone()
    else:
        arr = _to_numpy(name, value)
        if np.issubdtype(arr.dtype, np.floating):
            t = torch.as_tensor(arr, dtype=torch.get_default_dtype())
        else:
            t = torch.as_tensor(arr)
    if t.is_complex():
        raise DataError(f"{name}: complex values are not supported")
    if not allow_int and not torch.is_floating_point(t):
        t = t.to(torch.get_default_dtype())
    if dtype is not None:
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    return t


#: elements of one chunk of :func:`check_finite` (its temporaries stay a few times this)
_FINITE_CHUNK = 2**22


def check_finite(name: str, t: torch.Tensor) -> None:
    """No NaN or inf, and no value whose square overflows the tensor's float dtype (every
    likelihood and layer squares or multiplies its inputs: beyond ``sqrt(finfo.max)``, about
    1.8e19 in float32, the fit's arithmetic overflows and the error would surface elsewhere).
    Read in chunks of rows, so its temporaries do not grow with the number of rows."""
    if not torch.is_floating_point(t) or not t.numel():
        return
    flat = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
    rows = max(1, _FINITE_CHUNK // max(1, flat.shape[1]))
    big = 0.0
    for i in range(0, flat.shape[0], rows):
        part = flat[i : i + rows]
        if not bool(torch.isfinite(part).all()):
            bad = ~torch.isfinite(t)
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(bad.sum()) - n_nan
            raise DataError(
                f"{name}: contains {n_nan} NaN and {n_inf} inf values; clean or impute them first"
            )
        lo, hi = torch.aminmax(part)
        big = max(big, -float(lo), float(hi))
    limit = math.sqrt(torch.finfo(t.dtype).max)
    if big > limit:
        raise DataError(
            f"{name}: has values up to {big:.3g}, beyond what {str(t.dtype)[6:]} arithmetic "
            f"can square ({limit:.3g}); rescale {name} (e.g. standardize each column)"
        )


def check_x(
    name: str,
    x: Any,
    *,
    device=None,
    in_features: int | None = None,
    dtype=None,
    keep_int: bool = False,
) -> torch.Tensor:
    """Inputs as a tensor with a leading data dimension: floats in ``dtype`` (default: as
    :func:`as_tensor`), integers as floats unless ``keep_int`` (e.g. token ids for a module
    with an ``nn.Embedding``, see ``BNN.integer_inputs``)."""
    t = as_tensor(name, x, device=device, allow_int=keep_int)
    if dtype is not None and (t.is_floating_point() or not keep_int):
        t = t.to(dtype)
    if t.dim() == 0:
        raise DataError(
            f"{name}: expected an array of inputs with a leading data dimension, got a scalar"
        )
    if t.shape[0] == 0:
        raise DataError(f"{name}: is empty (0 rows)")
    if t.numel() == 0:
        raise DataError(f"{name}: has no values (shape {tuple(t.shape)})")
    check_finite(name, t)
    if in_features is not None:
        if t.dim() == 1 and in_features == 1:
            t = t[:, None]
        if t.dim() != 2 or t.shape[1] != in_features:
            raise DataError(
                f"{name}: the model takes inputs of shape (N, {in_features}), got {tuple(t.shape)}"
            )
    return t


def check_y(y: Any, n: int, *, device=None) -> torch.Tensor:
    t = as_tensor("y", y, device=device)
    if t.dim() == 0:
        raise DataError("y: expected one target per row of x, got a scalar")
    if t.shape[0] != n:
        raise DataError(f"y: has {t.shape[0]} rows but x has {n}; they must match")
    check_finite("y", t)
    return t


def plain_number(value: Any) -> Any:
    """A number as users get it from arrays, as the Python number it holds: NumPy scalars
    (``np.int64``, ``np.float32``, ``np.bool_``), 0-d NumPy arrays and 0-d tensors become
    ``int``/``float``/``bool`` (``.item()``); anything else is returned as it is (the check
    that follows refuses what is not a number, naming it).

    >>> import numpy as np, torch
    >>> plain_number(np.int64(3)), plain_number(np.float32(0.5)), plain_number(torch.tensor(2))
    (3, 0.5, 2)
    """
    if value is None or type(value) in (int, float, bool, str):
        return value
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        if value.dtype.kind in "biuf":
            return value.item()
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        if value.is_complex() or value.device.type == "meta" or value.is_quantized:
            return value
        try:
            return value.item()
        except (RuntimeError, ValueError):
            return value
    return value


def plain_ints(value: Any) -> Any:
    """:func:`plain_number` of a number, or of each entry of a list, tuple or 1-d array or
    tensor of numbers (layer widths, image sizes); anything else as it is."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1:
        return [plain_number(v) for v in value]
    if isinstance(value, (list, tuple)):
        return type(value)(plain_number(v) for v in value)
    return plain_number(value)


def check_count(
    name: str,
    value: Any,
    *,
    minimum: int = 1,
    maximum: int = MAX_COUNT,
    optional: bool = False,
) -> int | None:
    """An integer argument in ``[minimum, maximum]`` (``None`` too when ``optional``):
    Python or NumPy integers, 0-d integer arrays and tensors; bools and floats are refused."""
    value = plain_number(value)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise OptionError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value > maximum:
        raise OptionError(f"{name}: expected an integer <= {maximum}, got {value!r}")
    return int(value)


def check_probability(name: str, value: Any) -> float:
    """A number in the open interval (0, 1) (Python or NumPy, 0-d arrays and tensors)."""
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < 1:
        raise OptionError(f"{name}: expected a probability in (0, 1), got {value!r}")
    return float(value)


def check_positive_int(name: str, value: Any, *, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """An integer option in ``[minimum, maximum]`` (bools rejected; NumPy integers and 0-d
    integer arrays/tensors accepted)."""
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise OptionError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value > maximum:
        raise OptionError(f"{name}: expected an integer <= {maximum}, got {value!r}")
    return int(value)


def check_option_values(options: Any, dtype: torch.dtype) -> None:
    """Every number in a method's options (a dataclass) is usable in the fit's arithmetic.

    Floats must be finite and within the range of ``dtype`` (an ``lr`` of 1e308 cannot update
    float32 parameters); integers at most :data:`MAX_COUNT`. Checked once the data's dtype is
    known, before fitting.
    """
    big = torch.finfo(dtype).max if dtype.is_floating_point else torch.finfo().max

    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return
        if isinstance(v, numbers.Integral):
            if abs(int(v)) > MAX_COUNT:
                raise OptionError(f"{name}: expected an integer <= {MAX_COUNT}, got {v!r}")
        elif isinstance(v, numbers.Real):
            if not math.isfinite(float(v)):
                raise OptionError(f"{name}: expected a finite number, got {v!r}")
            if abs(float(v)) > big:
                raise OptionError(
                    f"{name}: {v!r} is beyond the range of the fit's {str(dtype)[6:]} arithmetic "
                    f"(largest {big:.3g})"
                )
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                check(f"{name}[{i}]", item)
        elif isinstance(v, Mapping):
            for k, item in v.items():
                check(f"{name}[{k!r}]", item)

    fields = getattr(options, "__dataclass_fields__", {})
    for f in fields:
        check(f, getattr(options, f))


def check_seed(name: str, value: Any) -> int:
    """A seed: an integer (Python or NumPy, 0-d arrays and tensors; not bool) in
    ``[0, 2**32 - 1]``."""
    value = plain_number(value)
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or not 0 <= value < 2**32
    ):
        raise OptionError(f"{name}: expected an integer in [0, 2**32 - 1], got {value!r}")
    return int(value)


def check_device(device: Any) -> torch.device | None:
    """``None`` or a usable ``torch.device`` (``"cuda"`` only where CUDA is available)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise OptionError(f"device: expected e.g. 'cpu' or 'cuda', got {device!r}") from e
    if (dev.type == "cuda" and not torch.cuda.is_available()) or (
        dev.type == "mps" and not torch.backends.mps.is_available()
    ):
        raise OptionError(f"device: {device!r} was asked for but is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    return dev


#: other libraries' names for options: name -> (whose name it is, marginalize's names in order
#: of preference; the first one the method takes is suggested)
FOREIGN_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "warmup_steps": ("Pyro's MCMC", ("num_warmup",)),
    "num_warmup_steps": ("", ("num_warmup",)),
    "tune": ("PyMC", ("num_warmup",)),
    "num_adapt": ("", ("num_warmup",)),
    "draws": ("PyMC", ("num_samples",)),
    "n_samples": ("", ("num_samples",)),
    "num_draws": ("", ("num_samples",)),
    "chains": ("PyMC", ("num_chains",)),
    "n_chains": ("", ("num_chains",)),
    "target_accept_prob": ("Pyro's and NumPyro's NUTS", ("target_accept",)),
    "adapt_delta": ("Stan", ("target_accept",)),
    "max_treedepth": ("Stan", ("max_tree_depth",)),
    "num_steps": ("Pyro's SVI loops", ("steps", "swag_steps")),
    "n_steps": ("", ("steps", "swag_steps")),
    "num_iterations": ("", ("steps", "swag_steps")),
    "iterations": ("", ("steps", "swag_steps")),
    "n_iter": ("scikit-learn", ("steps", "swag_steps")),
    "max_iter": ("scikit-learn", ("steps", "swag_steps")),
    "learning_rate": ("PyTorch, Keras and scikit-learn", ("lr", "swag_lr")),
    "learning_rate_init": ("scikit-learn's MLP", ("lr",)),
    "n_estimators": ("scikit-learn's ensembles", ("num_members", "num_models")),
    "n_members": ("", ("num_members", "num_models")),
    "ensemble_size": ("", ("num_members", "num_models")),
    "n_models": ("", ("num_models", "num_members")),
    "max_num_models": ("the SWAG reference code", ("max_rank",)),
    "dropout": ("", ("p",)),
    "dropout_rate": ("", ("p",)),
    "drop_rate": ("", ("p",)),
    "batchsize": ("", ("batch_size",)),
    "minibatch_size": ("", ("batch_size",)),
    "hessian_structure": ("laplace-torch", ("structure",)),
    "subset_of_weights": ("laplace-torch", ("subset", "bayesian_sites")),
    "n_particles": ("", ("num_particles",)),
    "mc_samples": ("", ("num_particles",)),
    "train_samples": ("IVON", ("num_particles",)),
}
#: names that are arguments of ``mz.fit`` itself (or the model), not options of a method
_NOT_OPTIONS = {
    "random_state": "seed is an argument of mz.fit: mz.fit(..., seed=0)",
    "random_seed": "seed is an argument of mz.fit: mz.fit(..., seed=0)",
    "rng_seed": "seed is an argument of mz.fit: mz.fit(..., seed=0)",
    "rng_key": "seed is an argument of mz.fit: mz.fit(..., seed=0)",
    "weight_decay": "the weight prior's scale sets the weight decay (mz.priors.Normal(scale=...))",
}


def option_hint(name: str, accepted: Mapping[str, Any]) -> str:
    """A did-you-mean for an unknown option ``name`` of a method taking ``accepted``: a close
    spelling, another library's name for one of them (Pyro's ``warmup_steps`` is
    ``num_warmup``), or the argument of ``mz.fit`` it is. Empty when there is none.

    >>> option_hint("warmup_steps", {"num_warmup": 100, "num_samples": 100})
    "did you mean 'num_warmup'? Pyro's MCMC calls it 'warmup_steps'"
    >>> option_hint("stepz", {"steps": 100})
    "did you mean 'steps'?"
    """
    import difflib

    foreign = FOREIGN_OPTIONS.get(name)
    if foreign is not None:
        whose, ours = foreign
        found = next((o for o in ours if o in accepted), None)
        if found is not None:
            return f"did you mean {found!r}?" + (f" {whose} calls it {name!r}" if whose else "")
    if name in _NOT_OPTIONS:
        return _NOT_OPTIONS[name]
    close = difflib.get_close_matches(name, list(accepted), n=1)
    return f"did you mean {close[0]!r}?" if close else ""


def check_options(method: str, given: Mapping[str, Any], accepted: Mapping[str, Any]) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        hints = []
        for k in unknown:
            hint = option_hint(k, accepted)
            hints.append(f"{k!r}" + (f" ({hint})" if hint else ""))
        raise OptionError(
            f"method {method!r} does not take option(s) {', '.join(hints)}; "
            f"it accepts: {', '.join(sorted(accepted)) or '(none)'}"
        )
