"""Command line: ``marginalize fit``, ``marginalize methods``, ``marginalize bench``.

``marginalize fit`` takes a data set (a built-in name, or a CSV/Parquet file with
``--target``), a model (``mlp:WIDTHS``, ``linear``, or the user's own ``PATH.py:FUNCTION``) and
methods by name; it checks everything (options of every method, data against the model,
output paths) before the first fit, fits each method with the same likelihood, prints one
results table in the target's units, and ends with the report's findings.

Under ``torchrun --nproc-per-node=K -m marginalize fit ...`` the processes form a gloo process
group: members and chains are spread over them (``docs/guide/distributed.md``), and only rank 0
prints, predicts, saves and writes the report (the other ranks log errors only).

Examples
--------
``marginalize fit --data boston --model mlp:50 --method nuts,map --report out/``

``marginalize fit --data mydata.csv --target price --model mymodel.py:model --method map,nuts
--save fits/ --json results.json --report out/ --strict``

Heavy modules (torch, Pyro, ArviZ, pandas) are imported only once a command runs, so
``marginalize --help`` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "main",
    "build_parser",
    "parse_model",
    "load_model_file",
    "read_table",
    "METHOD_DEFAULTS",
]

log = logging.getLogger("marginalize.cli")

#: settings used by the CLI for each method: (full, --quick). Chosen so that on the README's
#: demo (Boston housing, mlp:50) the report's checks find no problems; see README.md.
METHOD_DEFAULTS: dict[str, tuple[dict, dict]] = {
    "map": ({"steps": 3000, "lr": 1e-2}, {"steps": 300}),
    "svi-meanfield": ({"steps": 5000, "lr": 1e-2}, {"steps": 300}),
    "svi-lowrank": ({"steps": 5000, "lr": 1e-2, "rank": 10}, {"steps": 300}),
    "mc-dropout": ({"steps": 3000, "p": 0.05}, {"steps": 300}),
    "ensemble": ({"steps": 5000, "num_members": 5}, {"steps": 300, "num_members": 3}),
    "swag": (
        {"pretrain_steps": 3000, "swag_steps": 1000},
        {"pretrain_steps": 300, "swag_steps": 200},
    ),
    "multiswag": (
        {"num_models": 5, "pretrain_steps": 3000, "swag_steps": 1000},
        {"num_models": 3, "pretrain_steps": 300, "swag_steps": 200},
    ),
    "laplace": ({"steps": 3000}, {"steps": 300}),
    "bbb": ({"steps": 5000, "batch_size": 32}, {"steps": 300, "batch_size": 32}),
    "nuts": (
        {"num_samples": 300, "num_warmup": 300, "num_chains": 2, "max_tree_depth": 8},
        {"num_samples": 30, "num_warmup": 30, "num_chains": 2, "max_tree_depth": 5},
    ),
    "hmc": (
        {"num_samples": 300, "num_warmup": 300, "num_chains": 2, "num_steps": 50},
        {"num_samples": 30, "num_warmup": 30, "num_chains": 2, "num_steps": 10},
    ),
}

#: exit codes
EXIT_OK, EXIT_FIT_FAILED, EXIT_BAD_INPUT, EXIT_PROBLEMS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_TABLE_SUFFIXES = {
    ".csv": "csv",
    ".txt": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


# ---- data ------------------------------------------------------------------------------
@dataclass
class Data:
    """A table as arrays: ``x`` ``(N, D)`` float, ``y`` ``(N,)`` float or int labels."""

    name: str
    x: Any
    y: Any
    task: str
    target: str
    feature_names: list[str]
    num_classes: int | None = None
    classes: list | None = None
    notes: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    #: how the table's feature columns became ``x`` (None: a built-in data set, numeric)
    encoding: Any = None


def read_table(path: Path):
    """A CSV, TSV or Parquet file as a pandas DataFrame (``DataError`` if it cannot be read)."""
    import pandas as pd

    from marginalize.errors import DataError

    kind = _TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"--data: {str(path)!r} is not a table this command reads; expected a .csv, .tsv "
            "or .parquet file, or a built-in data set name"
        )
    try:
        if kind == "parquet":
            try:
                return pd.read_parquet(path)
            except ImportError as e:
                raise DataError(
                    f"--data: reading Parquet needs pyarrow ({e}); `pip install pyarrow`, or "
                    "pass a CSV file"
                ) from None
        return pd.read_csv(path, sep="\t" if kind == "tsv" else ",")
    except DataError:
        raise
    except Exception as e:  # pandas raises many types for unreadable files
        raise DataError(f"--data: cannot read {str(path)!r} as {kind}: {e}") from None


def table_to_data(df, target: str | None, task: str, name: str) -> Data:
    """Split a DataFrame into features and target, checking both; see ``marginalize fit -h``.

    Numeric and boolean columns are features as they are; text or categorical feature columns
    are one-hot encoded. A text, categorical or boolean target means classification (unless
    ``task`` says otherwise); a numeric one regression. Missing values are an error.
    """
    import difflib

    import numpy as np
    import pandas as pd

    from marginalize.errors import DataError

    cols = [str(c) for c in df.columns]
    if target is None:
        raise DataError(
            f"--target: name the target column of {name!r}; its columns are {cols[:20]}"
            + (" ..." if len(cols) > 20 else "")
        )
    if target not in cols:
        close = difflib.get_close_matches(target, cols, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"--target: no column {target!r} in {name!r}{hint} (columns: {cols[:20]})")
    df = df.rename(columns=str)
    if len(df) < 4:
        raise DataError(f"--data: {name!r} has {len(df)} rows; at least 4 are needed")
    missing = {c: int(n) for c, n in df.isna().sum().items() if n}
    if missing:
        raise DataError(
            f"--data: {name!r} has missing values ({missing}); fill or drop them first "
            "(nothing is imputed silently)"
        )
    yser = df[target]
    feats = df.drop(columns=[target])
    if feats.shape[1] == 0:
        raise DataError(f"--data: {name!r} has no feature columns besides the target")
    notes = []
    numeric_target = pd.api.types.is_numeric_dtype(yser) and not pd.api.types.is_bool_dtype(yser)
    hints = []
    if task == "auto":
        task = "regression" if numeric_target else "classification"
        hint = class_hint(yser, target) if task == "regression" else None
        if hint:
            hints.append(hint)
    if task == "regression":
        if not numeric_target:
            raise DataError(
                f"--task regression: target {target!r} is not numeric (dtype {yser.dtype})"
            )
        y = yser.to_numpy(np.float64)
        classes = None
        num_classes = None
    else:
        codes, uniques = pd.factorize(yser, sort=True)
        classes = [u.item() if hasattr(u, "item") else u for u in uniques]
        if len(classes) < 2:
            raise DataError(f"--target: {target!r} has a single class {classes}")
        if numeric_target and len(classes) > 50:
            raise DataError(
                f"--task classification: numeric target {target!r} has {len(classes)} distinct "
                "values; is it a regression target?"
            )
        y = codes.astype(np.int64)
        num_classes = len(classes)
    bad = [c for c in feats.columns if pd.api.types.is_datetime64_any_dtype(feats[c])]
    if bad:
        raise DataError(f"--data: date/time feature columns {bad} need encoding as numbers")
    from marginalize.runs import TableEncoding

    encoding, x = TableEncoding.from_table(feats)
    if encoding.categories:
        notes.append(
            f"one-hot encoded the text/categorical feature columns {list(encoding.categories)}"
        )
    return Data(
        name,
        x,
        y,
        task,
        target,
        encoding.feature_names,
        num_classes,
        classes,
        notes,
        hints,
        encoding,
    )


#: a numeric target with at most this many distinct integer values may be class labels
CLASS_HINT_MAX = 10


def class_hint(y, target: str) -> str | None:
    """A hint when a numeric target fitted as a regression looks like class labels: integer
    values, at most :data:`CLASS_HINT_MAX` distinct ones (e.g. scikit-learn's wine, 0/1/2)."""
    import numpy as np

    v = np.asarray(y, dtype=np.float64)
    if not v.size or not np.isfinite(v).all() or not np.array_equal(v, np.round(v)):
        return None
    distinct = np.unique(v)
    if len(distinct) > CLASS_HINT_MAX:
        return None
    shown = ", ".join(f"{d:g}" for d in distinct)
    return (
        f"target {target!r} is numeric with only {len(distinct)} distinct integer values "
        f"({shown}), so it is fitted as a regression; if they are classes, pass "
        "--task classification"
    )


def load_data(spec: str, target: str | None, task: str) -> Data:
    """A built-in data set by name, or a CSV/Parquet file."""
    from marginalize import datasets
    from marginalize.errors import DataError

    path = Path(spec)
    if spec in datasets.names() and not path.exists():
        if target is not None:
            raise DataError(f"--target: {spec!r} is a built-in data set with its own target")
        ds = datasets.load(spec)
        if task not in ("auto", ds.task):
            raise DataError(f"--task {task}: the built-in data set {spec!r} is {ds.task}")
        y = ds.y.astype("int64") if ds.task == "classification" else ds.y.astype("float64")
        return Data(
            ds.name,
            ds.x.astype("float64"),
            y,
            ds.task,
            "target",
            list(ds.feature_names or [f"x{i}" for i in range(ds.x.shape[1])]),
            ds.num_classes,
        )
    if not path.exists():
        if path.suffix.lower() in _TABLE_SUFFIXES:
            raise DataError(f"--data: no such file {spec!r}")
        import difflib

        close = difflib.get_close_matches(spec, datasets.names(), n=1)
        raise DataError(
            f"--data: {spec!r} is neither a file nor a built-in data set"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; built-in: {', '.join(datasets.names())}"
        )
    if path.is_dir():
        raise DataError(f"--data: {spec!r} is a folder; expected a .csv or .parquet file")
    return table_to_data(read_table(path), target, task, path.name)


# ---- models ----------------------------------------------------------------------------
def parse_model(
    spec: str,
    in_features: int,
    task: str,
    num_classes: int | None,
    noise: float | None = None,
    likelihood: str = "gaussian",
):
    """``mlp:50`` or ``mlp:100,100`` (hidden widths); ``linear`` for no hidden layer.

    ``noise``: fixed Gaussian noise SD on the standardized scale (None: learned);
    ``likelihood``: ``"gaussian"`` or ``"heteroscedastic"`` for regression."""
    import marginalize as mz
    from marginalize.errors import ModelError

    kind, _, rest = spec.partition(":")
    if kind == "linear":
        hidden: list[int] = []
    elif kind == "mlp":
        try:
            hidden = [int(h) for h in rest.split(",") if h] if rest else [50]
        except ValueError:
            raise ModelError(
                f"--model: bad hidden widths in {spec!r}; expected e.g. mlp:50 or mlp:100,100"
            ) from None
        if any(h < 1 for h in hidden):
            raise ModelError(f"--model: hidden widths must be positive, got {spec!r}")
    else:
        raise ModelError(
            f"--model: unknown model {spec!r}; expected mlp:WIDTHS, linear or PATH.py:FUNCTION"
        )
    if task == "classification":
        lik, out = "categorical", num_classes
    elif likelihood == "heteroscedastic":
        lik, out = "heteroscedastic", 1
    else:
        lik, out = mz.likelihoods.Gaussian(noise=noise), 1
    return mz.models.mlp(
        in_features,
        hidden,
        out,
        likelihood=lik,
        prior=mz.priors.ScaledNormal(gain=1.0),
        activation="relu",
    )


def _is_model_file(spec: str) -> bool:
    path = spec.rpartition(":")[0] if ":" in spec else spec
    return path.endswith(".py")


def load_model_file(spec: str, in_features: int, task: str, num_classes: int | None):
    """``PATH.py:FUNCTION``: the user's Pyro model, or a function returning one.

    The file is imported with importlib from the path given (it is the user's own code).
    ``FUNCTION`` is used as the model when it takes the data (``model(x, y=None)``); when it
    takes none of them, or keyword ``in_features``, it is called (with those of
    ``in_features``, ``out_features``, ``num_classes`` and ``task`` it accepts) and must return
    the model (e.g. ``mz.models.mlp(...)``). A module attribute that is a builder model is
    used as it is.
    """
    import importlib.util
    import inspect

    from marginalize.errors import ModelError
    from marginalize.models.base import BNN

    path_s, sep, func = spec.rpartition(":")
    if not sep:
        path_s, func = spec, ""
    path = Path(path_s)
    if not func:
        raise ModelError(f"--model: name the function in {path_s!r}: --model {path_s}:FUNCTION")
    if not path.is_file():
        raise ModelError(f"--model: no such file {path_s!r}")
    mod_name = f"marginalize_user_model_{abs(hash(str(path.resolve())))}"
    try:
        with user_code(f"--model: importing {path_s!r}"):
            spec_obj = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(module)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"--model: importing {path_s!r} raised {type(e).__name__}: {e}") from e
    if not hasattr(module, func):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ModelError(f"--model: {path_s!r} has no {func!r}; it defines {found}")
    obj = getattr(module, func)
    if isinstance(obj, BNN):
        return obj
    if not callable(obj):
        raise ModelError(f"--model: {spec!r} is a {type(obj).__name__}, not a model or function")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return obj
    required = [
        p
        for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    is_factory = "in_features" in params or not required
    if not is_factory:
        return obj
    given = {
        "in_features": in_features,
        "out_features": num_classes if task == "classification" else 1,
        "num_classes": num_classes,
        "task": task,
    }
    kwargs = {k: v for k, v in given.items() if k in params}
    try:
        with user_code(f"--model: calling {func}({kwargs})"):
            model = obj(**kwargs)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"--model: calling {func}({kwargs}) raised {type(e).__name__}: {e}") from e
    if not callable(model):
        raise ModelError(
            f"--model: {func}() returned a {type(model).__name__}; expected a model "
            "(a Pyro model function or e.g. mz.models.mlp(...))"
        )
    return model


class _ExitCalled(SystemExit):
    """``os._exit(code)`` called by the user's code while :func:`user_code` guards it."""


def _describe_exit(e: SystemExit) -> str:
    how = "os._exit" if isinstance(e, _ExitCalled) else "sys.exit"
    return f"called {how}({e.code!r})"


@contextlib.contextmanager
def user_code(what: str):
    """Run the user's code (the model file, its model): an exit from it is an error.

    ``sys.exit`` / ``exit()`` / ``raise SystemExit`` in the model's code become a
    ``ModelError`` naming ``what`` (the command would otherwise end with the model's status,
    0 for ``sys.exit(0)``, without results), and ``os._exit`` is caught the same way in this
    process (child processes the model starts keep the real one). ``KeyboardInterrupt`` goes
    on as an interruption (exit status 130).
    """
    from marginalize.errors import ModelError

    pid, real = os.getpid(), os._exit

    def guarded(code):
        if os.getpid() != pid:  # a child process (fork) ends as it asked
            real(code)
        raise _ExitCalled(code)

    os._exit = guarded
    try:
        yield
    except SystemExit as e:
        raise ModelError(
            f"{what} {_describe_exit(e)}; a model file and its model must return (or raise "
            "an error), never end the process"
        ) from None
    finally:
        os._exit = real


# ---- options ---------------------------------------------------------------------------
def options_file(text: str | None) -> Path | None:
    """The file ``--options`` names (``@PATH``, or the path of an existing file), else None."""
    if not text:
        return None
    if text.startswith("@"):
        return Path(text[1:])
    if not text.lstrip().startswith("{") and Path(text).is_file():
        return Path(text)
    return None


def _parse_options(text: str | None, names: list[str]) -> dict[str, dict]:
    """``--options``: a JSON object mapping method names (from ``--method``) to option objects,
    given as text or as a file (``@PATH`` or the path of a ``.json`` file)."""
    from marginalize.errors import OptionError

    if not text:
        return {}
    path = options_file(text)
    if path is not None:
        if not path.is_file():
            raise OptionError(f"--options: no such file {str(path)!r}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise OptionError(f"--options: cannot read {str(path)!r} ({e})") from None
    try:
        options = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        where = "" if path is None else f" in {str(path)!r}"
        raise OptionError(f"--options: not valid JSON{where} ({e})") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise OptionError(
            "--options: expected a JSON object of method -> options, e.g. "
            '{"nuts": {"num_chains": 4}}'
        )
    extra = sorted(set(options) - set(names))
    if extra:
        raise OptionError(f"--options: given for {extra}, which --method does not run ({names})")
    return options


def method_options(names: list[str], quick: bool, user: dict[str, dict]) -> dict[str, dict]:
    """The options each method will run with, every one validated before any fit."""
    from marginalize.errors import OptionError

    out = {}
    for m in names:
        cls = _get_method(m)  # unknown names raise with a suggestion
        full, small = METHOD_DEFAULTS.get(cls.name, ({}, {}))
        accepted = cls.option_defaults()
        kw = {k: v for k, v in {**full, **(small if quick else {})}.items() if k in accepted}
        for k, v in user.get(m, {}).items():
            # JSON has one kind of number: 1e3 or 100.0 is the integer 100 for an integer option
            if (
                isinstance(v, float)
                and v.is_integer()
                and abs(v) <= 2**53
                and not isinstance(accepted.get(k), float)
            ):
                v = int(v)
            kw[k] = v
        try:
            cls.make_options(kw)
        except (OptionError, TypeError, ValueError) as e:
            raise OptionError(f"--options for {m}: {e}") from None
        out[m] = kw
    return out


def _get_method(name: str):
    """The registered method ``name`` (an unknown name: an ``OptionError`` naming --method)."""
    import marginalize as mz
    from marginalize.errors import OptionError

    try:
        return mz.inference.get_method(name)
    except OptionError as e:
        raise OptionError(f"--method: {e}") from None


def _check_args(args) -> None:
    from marginalize.errors import OptionError

    if not 0 < args.test_size < 1:
        raise OptionError(f"--test-size: expected a fraction in (0, 1), got {args.test_size}")
    if args.num_samples < 1:
        raise OptionError(f"--num-samples: expected an integer >= 1, got {args.num_samples}")
    if not 0 <= args.seed < 2**32:
        raise OptionError(f"--seed: expected an integer in [0, 2**32 - 1], got {args.seed}")
    if args.threads < 1:
        raise OptionError(f"--threads: expected an integer >= 1, got {args.threads}")


def _parse_noise(text: str | None) -> float | None:
    from marginalize.errors import OptionError

    if text is None or text == "learned":
        return None
    try:
        v = float(text)
    except ValueError:
        raise OptionError(
            f"--noise: expected 'learned' or a positive number, got {text!r}"
        ) from None
    if not (v > 0 and math.isfinite(v)):
        raise OptionError(f"--noise: expected a positive number, got {text!r}")
    return v


def _writable_dir(path: Path, flag: str) -> Path:
    import os

    from marginalize.errors import OptionError

    if path.exists() and not path.is_dir():
        raise OptionError(f"{flag}: {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"{flag}: cannot create folder {str(path)!r}: {e}") from None
    if not os.access(path, os.W_OK):
        raise OptionError(f"{flag}: folder {str(path)!r} is not writable")
    return path


def _writable_file(path: Path, flag: str) -> Path:
    import os

    from marginalize.errors import OptionError

    if path.is_dir() or str(path).endswith(("/", os.sep)):
        raise OptionError(f"{flag}: {str(path)!r} is a folder; expected a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OptionError(f"{flag}: {str(parent)!r} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"{flag}: cannot create folder {str(parent)!r}: {e}") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OptionError(f"{flag}: {str(path)!r} is not writable")
    return path


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file: the same inode when both exist (symbolic and hard
    links, another spelling of the path, a case-insensitive file system), else the same
    resolved path."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def check_outputs(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path]]) -> None:
    """No output file is one of the inputs or another output (checked before anything is read
    or written): ``outputs`` and ``inputs`` are ``(argument, path)`` pairs.

    Raises
    ------
    OptionError
        ``--json: 'data.csv' is the --data file 'data.csv'; ...``
    """
    from marginalize.errors import OptionError

    for flag, o in outputs:
        for iflag, i in inputs:
            if _same_file(o, i):
                same = "" if str(o) == str(i) else f" {str(i)!r}"
                raise OptionError(
                    f"{flag}: {str(o)!r} is the {iflag} file{same}; writing there would destroy "
                    "that input: choose another path"
                )
    for k, (flag, o) in enumerate(outputs):
        for other, p in outputs[:k]:
            if _same_file(o, p):
                raise OptionError(
                    f"{flag}: {str(o)!r} is also where {other} writes; one would overwrite the "
                    "other: choose another path"
                )


def _output_paths(args, names, options, save_dir, json_path, report_dir):
    """Every file the command writes, as ``(argument, path)``."""
    outputs: list[tuple[str, Path]] = []
    if json_path is not None:
        outputs.append(("--json", json_path))
    if save_dir is not None:
        outputs += [(f"--save ({m}.pt)", save_dir / f"{m}.pt") for m in names]
        outputs.append(("--save (run.json)", save_dir / "run.json"))
    if report_dir is not None:
        outputs.append(("--report (report.html)", report_dir / "report.html"))
    for m in names:
        ckpt = options[m].get("checkpoint")
        if ckpt is not None:
            outputs.append((f"--options {m}.checkpoint", Path(ckpt)))
    return outputs


def _input_paths(args) -> list[tuple[str, Path]]:
    """Every file the command reads, as ``(argument, path)``."""
    inputs: list[tuple[str, Path]] = []
    data = Path(args.data)
    if data.is_file():
        inputs.append(("--data", data))
    if _is_model_file(args.model):
        model = Path(args.model.rpartition(":")[0] if ":" in args.model else args.model)
        if model.is_file():
            inputs.append(("--model", model))
    opts = options_file(args.options)
    if opts is not None and opts.is_file():
        inputs.append(("--options", opts))
    return inputs


def _check_checkpoints(options: dict[str, dict]) -> None:
    """A checkpoint file must not exist yet (a fit never overwrites one) and its folder must
    take a new file: checked before the first fit (a fit checks it only when it starts)."""
    from marginalize.errors import OptionError

    for m, kw in options.items():
        ckpt = kw.get("checkpoint")
        if ckpt is None:
            continue
        flag, folder = f"--options {m}.checkpoint", Path(ckpt).parent
        if os.path.lexists(ckpt):
            raise OptionError(
                f"{flag}: {str(ckpt)!r} already exists; the command never overwrites a "
                "checkpoint (continue that fit with mz.resume, or choose another path)"
            )
        if not folder.is_dir():
            raise OptionError(f"{flag}: the folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OptionError(f"{flag}: the folder {str(folder)!r} is not writable")


def split_rows(data: Data, test_size: float, seed: int):
    """The train/test split of ``data`` (stratified by class for classification), with an
    error naming ``--test-size`` (or ``--target``) when a split would be unusable."""
    import numpy as np

    from marginalize import datasets
    from marginalize.errors import DataError

    n = len(data.x)
    n_test = math.ceil(test_size * n)  # as scikit-learn counts them
    n_train = n - n_test
    what = f"--test-size {test_size}: {n_train} train / {n_test} test rows"
    if n_test < 2 or n_train < 2:
        raise DataError(f"{what}; both need at least 2")
    stratify = data.task == "classification"
    if stratify:
        labels, counts = np.unique(data.y, return_counts=True)
        k = len(labels)
        if int(counts.min()) < 2:
            c = labels[int(counts.argmin())]
            name = data.classes[int(c)] if data.classes else int(c)
            raise DataError(
                f"--target {data.target!r}: class {name!r} has {int(counts.min())} row; the "
                "stratified train/test split needs at least 2 rows of every class"
            )
        if n_test < k or n_train < k:
            raise DataError(
                f"{what}; a stratified split of {k} classes needs at least {k} rows in each"
            )
    try:
        return datasets.train_test_split(
            data.x, data.y, test_size=test_size, seed=seed, stratify=stratify
        )
    except ValueError as e:
        raise DataError(f"{what}: the split failed ({e})") from None


def check_columns(data: Data, x, y, raw_x, raw_y, standardized: bool) -> None:
    """Every feature column and the target: finite and within what the arithmetic can square,
    the raw values ``raw_x``/``raw_y`` in float64 when they are standardized (beyond
    ``sqrt(max)`` their SD overflows and the column would silently become zeros), and the
    values the fit gets (``x``/``y``) in torch's default dtype. An error names the column."""
    import numpy as np
    import torch

    from marginalize.errors import DataError

    dtype = torch.get_default_dtype()
    stages = []
    if standardized:
        f64 = math.sqrt(np.finfo(np.float64).max)
        stages.append((raw_x, raw_y, f64, "too large to standardize: rescale it"))
    hint = f"beyond what {str(dtype)[6:]} arithmetic can square: rescale it" + (
        "" if standardized else ", or drop --no-standardize"
    )
    stages.append((x, y, math.sqrt(torch.finfo(dtype).max), hint))
    for xs, ys, limit, hint in stages:
        cols = [
            (f"--data {data.name!r}: column {c!r}", xs[:, j])
            for j, c in enumerate(data.feature_names)
        ]
        if data.task == "regression":
            cols.append((f"--target {data.target!r}", ys))
        for what, v in cols:
            v = np.asarray(v, dtype=np.float64)
            if not np.isfinite(v).all():
                raise DataError(f"{what}: has non-finite values (inf or NaN); {hint}")
            big = float(np.abs(v).max()) if v.size else 0.0
            if big > limit:
                raise DataError(f"{what}: has values up to {big:.3g}, {hint}")


def _cli_error(e: Exception, data: Data, args):
    """An error of the model contract or the data, as the command's arguments name it."""
    from marginalize.errors import DataError, ModelError

    msg = str(e)
    if isinstance(e, DataError):
        if msg.startswith("x: "):
            return DataError(f"--data {data.name!r} (the feature columns): {msg[3:]}")
        if msg.startswith("y: "):
            return DataError(f"--target {data.target!r}: {msg[3:]}")
        return DataError(f"--data {data.name!r}: {msg}")
    if isinstance(e, ModelError) and not msg.startswith("--model"):
        return ModelError(f"--model {args.model}: {msg}")
    return e


# ---- output ----------------------------------------------------------------------------
class _Out:
    """Terminal output: nothing with ``--quiet``."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, *parts: str) -> None:
        if not self.quiet:
            print(*parts, flush=True)


#: the results table's columns: (header, column of ``mz.evaluate``'s table, number format)
_COLUMNS = {
    "regression": [
        ("RMSE", "rmse", "{:.3f}"),
        ("MAE", "mae", "{:.3f}"),
        ("NLL", "nll", "{:.3f}"),
        ("cov90", "coverage90", "{:.2f}"),
        ("width90", "width90", "{:.3f}"),
    ],
    "classification": [
        ("accuracy", "accuracy", "{:.3f}"),
        ("NLL", "nll", "{:.3f}"),
        ("ECE", "ece", "{:.3f}"),
        ("Brier", "brier", "{:.3f}"),
    ],
}


def format_table(table, seconds: dict[str, float]) -> list[str]:
    """The results table as text lines: a header, a rule, one row per fit (``table`` from
    ``mz.evaluate``), laid out by pandas (``DataFrame.to_string``), so a wide value widens its
    column instead of running into the next one; a missing value reads ``n/a``."""
    import pandas as pd

    task = table.attrs.get("task", "regression")
    cols = _COLUMNS[task]
    multi = table.index.nlevels > 1
    names = ["/".join(map(str, i)) if multi else str(i) for i in table.index]
    frame = pd.DataFrame(
        {title: pd.to_numeric(table[key], errors="coerce").to_numpy() for title, key, _ in cols},
        index=pd.Index(names),
    )
    frame["fit s"] = [seconds.get(str(i[0] if multi else i), math.nan) for i in table.index]
    frame = frame.rename_axis(index=None, columns="method")  # "method" heads the name column

    def fmt(spec):
        return lambda v: "n/a" if not math.isfinite(v) else spec.format(v)

    formatters = {title: fmt(spec) for title, _, spec in cols}
    formatters["fit s"] = fmt("{:.1f}")
    lines = frame.to_string(formatters=formatters, na_rep="n/a").splitlines()
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def _configure_logging(quiet: bool, verbose: int) -> None:
    """Warnings and errors by default; ``-v``: marginalize's INFO lines; ``-vv``: everyone's
    (third-party INFO such as ``arviz.preview`` only then); ``--quiet``: errors only."""
    level = logging.ERROR if quiet else logging.WARNING
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    logging.basicConfig(
        level=logging.INFO if verbose >= 2 else level,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("marginalize").setLevel(logging.INFO if verbose >= 1 else level)
    for name in ("arviz", "arviz_base", "arviz_stats", "arviz_plots", "pyro", "matplotlib"):
        logging.getLogger(name).setLevel(logging.INFO if verbose >= 2 else logging.WARNING)
    # Python warnings (the package's FitWarning, ...) go through logging, one line each without
    # the source line of the caller: --quiet silences them
    warnings.showwarning = _log_warning
    if quiet:
        warnings.simplefilter("ignore")


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` while a command runs: ``WARNING marginalize: FitWarning: ...``."""
    logging.getLogger("marginalize").warning("%s: %s", category.__name__, message)


# ---- fit -------------------------------------------------------------------------------
def _fit_cmd(args) -> int:
    from marginalize.inference.engines import distributed

    _check_args(args)
    main_rank = distributed.is_main()  # a torchrun launch: only rank 0 predicts and writes
    out = _Out(args.quiet or not main_rank)
    import numpy as np
    import torch

    import marginalize as mz
    from marginalize import datasets
    from marginalize._files import write_text
    from marginalize._validation import check_device
    from marginalize.core.problem import prepare
    from marginalize.diagnostics.report import build_report, describe_likelihood

    # 1. everything that can be checked is checked before the first fit
    names = [m.strip() for m in args.method.split(",") if m.strip()]
    if not names:
        raise mz.OptionError("--method: expected one or more method names separated by commas")
    names = list(dict.fromkeys(_get_method(m).name for m in names))
    options = method_options(names, args.quick, _parse_options(args.options, names))
    noise = _parse_noise(args.noise)
    try:
        device = check_device(args.device)
    except mz.OptionError as e:
        raise mz.OptionError(f"--{e}") from None  # "device: ..." -> "--device: ..."
    # no output over an input or over another output (lost work), before anything is written
    save_dir, json_path, report_dir = (
        None if a is None else Path(a) for a in (args.save, args.json, args.report)
    )
    check_outputs(
        _output_paths(args, names, options, save_dir, json_path, report_dir), _input_paths(args)
    )
    _check_checkpoints(options)
    save_dir = _writable_dir(save_dir, "--save") if save_dir else None
    json_path = _writable_file(json_path, "--json") if json_path else None
    report_dir = _writable_dir(report_dir, "--report") if report_dir else None
    try:
        torch.set_num_threads(args.threads)
    except RuntimeError as e:
        raise mz.OptionError(f"--threads {args.threads}: {e}") from None

    data = load_data(args.data, args.target, args.task)
    xtr, ytr, xte, yte = split_rows(data, args.test_size, args.seed)
    user_model = _is_model_file(args.model)
    if user_model and (args.noise is not None or args.likelihood is not None):
        raise mz.OptionError(
            "--noise / --likelihood: for the built-in models; a model file defines its own "
            "likelihood"
        )
    if data.task == "classification" and (args.noise is not None or args.likelihood):
        raise mz.OptionError("--noise / --likelihood: for regression only")
    sx = datasets.Standardizer(xtr) if args.standardize else None
    sy = datasets.Standardizer(ytr) if args.standardize and data.task == "regression" else None
    xtr_s = sx(xtr) if sx else xtr
    xte_s = sx(xte) if sx else xte
    ytr_s = sy(ytr) if sy else ytr
    yte_s = sy(yte) if sy else yte
    check_columns(
        data,
        np.concatenate([xtr_s, xte_s]),
        np.concatenate([ytr_s, yte_s]),
        np.concatenate([xtr, xte]),
        np.concatenate([ytr, yte]),
        bool(sx),
    )
    if user_model:
        model = load_model_file(args.model, xtr.shape[1], data.task, data.num_classes)
    else:
        model = parse_model(
            args.model,
            xtr.shape[1],
            data.task,
            data.num_classes,
            noise=noise,
            likelihood=args.likelihood or "gaussian",
        )
    dev = device or torch.device("cpu")
    ydt = torch.get_default_dtype() if data.task == "regression" else torch.long
    x_train = torch.as_tensor(xtr_s, dtype=torch.get_default_dtype(), device=dev)
    y_train = torch.as_tensor(ytr_s, dtype=ydt, device=dev)
    x_test = torch.as_tensor(xte_s, dtype=torch.get_default_dtype(), device=dev)
    y_test = torch.as_tensor(yte_s, dtype=ydt, device=dev)
    try:  # the model contract, against the data
        with user_code(f"--model {args.model}: the model"):
            prepare(model, x_train, y_train, device=device)
    except (mz.DataError, mz.ModelError) as e:
        raise _cli_error(e, data, args) from None
    y_loc = None if sy is None else float(np.asarray(sy.mean).reshape(-1)[0])
    y_scale = None if sy is None else float(np.asarray(sy.std).reshape(-1)[0])

    # 2. what is run, said up front
    out(
        f"data: {data.name} ({len(data.x)} rows, {data.x.shape[1]} features), "
        f"target {data.target!r} ({data.task}"
        + (f", {data.num_classes} classes" if data.num_classes else "")
        + f"), {len(xtr)} train / {len(xte)} test (--test-size {args.test_size}, "
        f"--seed {args.seed})"
    )
    for n in data.notes:
        out(f"data: {n}")
    for n in data.hints:
        out(f"hint: {n}")
    if args.standardize:
        out(
            "data: inputs"
            + (" and target" if sy is not None else "")
            + " standardized with the training split's mean and SD"
        )
    from marginalize.models.base import BNN

    model_desc = (
        repr(model)
        if isinstance(model, BNN)
        else f"{getattr(model, '__name__', type(model).__name__)} from {args.model}"
    )
    out(f"model: {model_desc}")

    # 3. fits
    posts: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    saved: dict[str, str] = {}
    failed: dict[str, str] = {}
    for m in names:
        t0 = time.perf_counter()
        try:
            with user_code(f"--model {args.model}: the model (fitting {m!r})"):
                post = mz.fit(
                    model,
                    x_train,
                    y_train,
                    method=m,
                    seed=args.seed,
                    progress=not args.quiet,
                    **options[m],
                )
        except mz.FitError as e:
            failed[m] = str(e)
            print(f"marginalize: {m}: the fit failed: {e}", file=sys.stderr)
            continue
        if post.info.interrupted:  # Ctrl-C, or a KeyboardInterrupt raised by the model's code
            raise KeyboardInterrupt(f"the {m} fit was interrupted")
        secs = time.perf_counter() - t0
        post.info.fit_seconds = post.info.fit_seconds or secs
        posts[m], seconds[m] = post, secs
        if save_dir is not None and main_rank:
            path = save_dir / f"{m}.pt"
            post.save(path)
            saved[m] = str(path)
        out(f"fitted {m} in {secs:.1f} s" + (f" (saved to {saved[m]})" if m in saved else ""))
    if not posts:
        return EXIT_FIT_FAILED
    if not main_rank:  # the fits are gathered on every rank; rank 0 evaluates and writes
        return EXIT_FIT_FAILED if failed else EXIT_OK
    first = next(iter(posts.values()))
    likelihood = describe_likelihood(first, y_scale)
    out(f"likelihood (every method): {likelihood}")

    # 4. one evaluation: the table, the report and its findings
    notes = [f"Command: marginalize {' '.join(args.argv)}"]
    with user_code(f"--model {args.model}: the model (predicting)"):
        res = build_report(
            posts,
            x_test,
            y_test,
            path=None if report_dir is None else report_dir / "report.html",
            title=f"marginalize: {data.name}",
            num_samples=args.num_samples,
            seed=args.seed,
            y_loc=y_loc,
            y_scale=y_scale,
            notes=notes,
            feature_names=(
                data.feature_names if len(data.feature_names) == x_test.shape[1] else None
            ),
            class_names=data.classes,
        )
    table = res.metrics
    units = "in the target's units" if data.task == "regression" else ""
    out("")
    out(f"results on the {len(xte)} test points {units}".rstrip() + ":")
    for line in format_table(table, seconds):
        out("  " + line)
    for name, reasons in (table.attrs.get("not_applicable") or {}).items():
        for r in reasons:
            out(f"  note: {name}: {r}")
    if res.path is not None:
        out(f"report: {res.path}")
    if res.problems:
        out(f"findings: {len(res.problems)} problem(s):")
        for fit_name, f in res.problems:
            out(f"  {fit_name}: {f.check}: {f.message}")
    else:
        out("findings: no problems found by the report's checks")
    for h in data.hints if res.problems else []:
        out(f"hint: {h}")
    if save_dir is not None:
        out(
            f"saved: {', '.join(saved.values())} and {save_dir / 'run.json'}; predict on new "
            f"rows with mz.load_run({str(save_dir)!r}"
            + (f", model=<the function in {args.model}>" if user_model else "")
            + ").predict(dataframe)"
        )
        from marginalize.runs import RUN_FORMAT, RUN_VERSION, TableEncoding

        encoding = data.encoding or TableEncoding(
            list(data.feature_names), {}, list(data.feature_names)
        )
        encoding.x_mean = None if sx is None else np.asarray(sx.mean).tolist()
        encoding.x_std = None if sx is None else np.asarray(sx.std).tolist()
        model_file = None
        if user_model:
            mpath, _, mfunc = args.model.rpartition(":")
            model_file = {"path": str(Path(mpath).resolve()), "function": mfunc}
        run = {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "data": data.name,
            "target": data.target,
            "task": data.task,
            "feature_names": data.feature_names,
            "classes": data.classes,
            "x_mean": encoding.x_mean,
            "x_std": encoding.x_std,
            "y_mean": y_loc,
            "y_std": y_scale,
            "encoding": encoding.to_dict(),
            "model": args.model,
            "model_file": model_file,
            "fits": saved,
        }
        write_text(save_dir / "run.json", json.dumps(run, indent=2))
    if json_path is not None:
        rows = []
        for name, row in table.iterrows():
            r = {"method": str(name), "fit_seconds": seconds.get(str(name))}
            r.update(
                {k: (None if not math.isfinite(float(v)) else float(v)) for k, v in row.items()}
            )
            rows.append(r)
        doc = {
            "command": ["marginalize", *args.argv],
            "data": data.name,
            "target": data.target,
            "task": data.task,
            "n_train": len(xtr),
            "n_test": len(xte),
            "units": "target" if data.task == "regression" else None,
            "likelihood": likelihood,
            "model": model_desc,
            "results": rows,
            "not_applicable": table.attrs.get("not_applicable") or {},
            "problems": [
                {"fit": n, "check": f.check, "message": f.message} for n, f in res.problems
            ],
            "notes": [{"fit": n, "check": f.check, "message": f.message} for n, f in res.notes],
            "hints": data.hints,
            "failed": failed,
            "report": None if res.path is None else str(res.path),
            "saved": saved,
        }
        write_text(json_path, json.dumps(doc, indent=2))
        out(f"json: {json_path}")
    if failed:
        return EXIT_FIT_FAILED
    if args.strict and res.problems:
        return EXIT_PROBLEMS
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (built without importing torch)."""
    p = argparse.ArgumentParser(
        prog="marginalize",
        description="Bayesian neural networks on Pyro: fit with inference methods by name, "
        "compare them on held-out data, and write the ArviZ report.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("methods", help="list the registered inference methods")
    f = sub.add_parser(
        "fit",
        help="fit a BNN with methods chosen by name",
        description="Fit a model with each method named in --method, print one results table "
        "(held-out data, target's units) and the report's findings. Every option, the data "
        "and the model are checked before the first fit. Exit codes: 0 done, 1 a fit "
        "failed (or an output could not be written), 2 bad input, 3 problems found (with "
        "--strict), 130 interrupted.",
    )
    d = f.add_argument_group("data")
    d.add_argument(
        "--data",
        default="boston",
        help="a built-in data set (boston, breast_cancer, digits, gap, sine, two_moons) or a "
        ".csv/.tsv/.parquet file (default: boston)",
    )
    d.add_argument("--target", default=None, help="the target column of a file")
    d.add_argument(
        "--task",
        choices=["auto", "regression", "classification"],
        default="auto",
        help="auto: a numeric target is regression, a text/categorical/boolean one classification",
    )
    d.add_argument("--test-size", type=float, default=0.1, help="held-out fraction (0.1)")
    d.add_argument(
        "--no-standardize",
        dest="standardize",
        action="store_false",
        help="fit the raw values (default: inputs and a regression target are standardized "
        "with the training split's statistics; results are reported in the target's units)",
    )
    m = f.add_argument_group("model and methods")
    m.add_argument(
        "--model",
        default="mlp:50",
        help="mlp:WIDTHS (e.g. mlp:50, mlp:100,100), linear, or PATH.py:FUNCTION: your Pyro "
        "model model(x, y=None), or a function returning a model (called with those of "
        "in_features, out_features, num_classes, task it takes)",
    )
    m.add_argument(
        "--likelihood",
        choices=["gaussian", "heteroscedastic"],
        default=None,
        help="regression likelihood of the built-in models, the same for every method "
        "(default gaussian)",
    )
    m.add_argument(
        "--noise",
        default=None,
        help="Gaussian noise SD of the built-in models on the standardized scale: 'learned' "
        "(default; a HalfNormal(1) prior) or a number, the same for every method",
    )
    m.add_argument("--method", default="map", help="comma-separated method names (default map)")
    m.add_argument(
        "--options",
        default=None,
        help='JSON: per-method options over the defaults, e.g. {"nuts": {"num_chains": 4}}, '
        "or a JSON file holding them (@PATH, or the path of an existing file)",
    )
    m.add_argument("--quick", action="store_true", help="small settings (a smoke test)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--num-samples", type=int, default=500, help="posterior draws for evaluation")
    m.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    m.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for small networks)",
    )
    o = f.add_argument_group("output")
    o.add_argument("--report", default=None, help="folder for the HTML report (report.html)")
    o.add_argument(
        "--save", default=None, help="folder: each fit as METHOD.pt (mz.load) + run.json"
    )
    o.add_argument("--json", default=None, help="file: the results table and findings as JSON")
    o.add_argument(
        "--strict", action="store_true", help="exit 3 when the report's checks find problems"
    )
    o.add_argument("--quiet", action="store_true", help="print nothing but errors")
    o.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: marginalize's log lines; -vv: third-party INFO lines too",
    )
    from marginalize.benchmarks import add_subcommands as _bench_subcommands

    _bench_subcommands(
        sub.add_parser(
            "bench", help="benchmarks: uci, classification, active-learning, reference"
        ).add_subparsers(dest="bench", required=True)
    )
    return p


class _Settings:
    """Logging and warning settings for one command, restored afterwards (``main`` is also
    called in-process, e.g. by tests and notebooks)."""

    def __init__(self, quiet: bool, verbose: int):
        self.quiet, self.verbose = quiet, verbose

    def __enter__(self):
        root = logging.getLogger()
        self._root = (list(root.handlers), root.level)
        names = (
            "marginalize",
            "arviz",
            "arviz_base",
            "arviz_stats",
            "arviz_plots",
            "pyro",
            "matplotlib",
            "py.warnings",
        )
        self._levels = {n: logging.getLogger(n).level for n in names}
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        _configure_logging(self.quiet, self.verbose)
        return self

    def __exit__(self, *exc):
        self._warn.__exit__(*exc)  # restores warnings.showwarning and the filters
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in self._root[0]:
            root.addHandler(h)
        root.setLevel(self._root[1])
        for n, level in self._levels.items():
            logging.getLogger(n).setLevel(level)
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.cmd == "methods":
        return _run(args, argv)
    from marginalize.inference.engines import distributed

    # launched by torchrun: one gloo process group (members and chains over the ranks)
    created = distributed.init_from_env("gloo")
    finished = False
    try:
        if args.cmd == "bench":  # the benchmarks log their progress at INFO themselves
            from marginalize.benchmarks import run_parsed

            if not distributed.is_main():  # other ranks: errors only
                logging.basicConfig(
                    level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
                )

            rc = run_parsed(args, ["marginalize", *argv])
        else:
            quiet = getattr(args, "quiet", False) or not distributed.is_main()
            with _Settings(quiet, getattr(args, "verbose", 0)):
                rc = _run(args, argv)
        finished = True
        return rc
    finally:
        if created:
            if finished:  # rank 0 still writes the report: the ranks leave the group together
                distributed.shutdown()
            else:
                import torch.distributed

                torch.distributed.destroy_process_group()


def _run(args, argv: list[str]) -> int:
    if args.cmd == "methods":
        import marginalize as mz

        for row in mz.method_info().values():
            print(f"{row['name']:>14}  {row['summary']}")
        return EXIT_OK
    from marginalize.errors import FitError

    try:
        return _fit_cmd(args)
    except (ValueError, TypeError) as e:  # bad input: DataError, ModelError, OptionError, ...
        print(f"marginalize: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FitError as e:
        print(f"marginalize: the fit failed: {e}", file=sys.stderr)
        return EXIT_FIT_FAILED
    except OSError as e:  # an output that cannot be written (a full disk, a file-size limit)
        print(f"marginalize: error: {e}", file=sys.stderr)
        return EXIT_FIT_FAILED
    except KeyboardInterrupt as e:
        why = str(e)
        print(
            "marginalize: interrupted"
            + (
                f" ({why}: Ctrl-C, or a KeyboardInterrupt raised by the model's code)"
                if why
                else ""
            ),
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except SystemExit as e:  # user code outside the guarded calls: never a silent exit status
        print(
            f"marginalize: error: the model's code {_describe_exit(e)} during the command",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
