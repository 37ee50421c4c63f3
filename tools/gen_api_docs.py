"""Generate the API reference and the methods table from the code itself.

Writes two things, so the documentation cannot drift from the code:

* ``docs/api.md``: every public module of ``marginalize`` (the list in :data:`MODULES`), with
  the module docstring and, for each name in its ``__all__`` (functions and classes defined
  there), the signature and the docstring; for classes also their public methods and
  properties. Found with :mod:`inspect`; numpy-style sections become bold headings, parameter
  lists become bullet lists and doctest examples become code blocks.
* the block between ``<!-- BEGIN GENERATED: methods -->`` and ``<!-- END GENERATED: methods -->``
  in ``docs/guide/methods.md``: one row per registered method from ``mz.method_info()`` (summary,
  cost, reference) and each method's options with their defaults. The prose around the block is
  kept.
* the block between ``<!-- BEGIN GENERATED: quality -->`` and ``<!-- END GENERATED: quality -->``
  in the same page: every method at its defaults scored against the NUTS reference posteriors,
  from the committed ``benchmarks/results/reference.jsonl`` (``marginalize bench reference``).

Usage (from the repository root; ``make docs`` runs the first)::

    python tools/gen_api_docs.py           # rewrite both
    python tools/gen_api_docs.py --check   # exit 1 (and say which) if either is out of date

``tests/test_docs.py`` runs the check, so a change to a docstring or to a method's options
fails the tests until ``make docs`` is run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_PATH = ROOT / "docs" / "api.md"
METHODS_PATH = ROOT / "docs" / "guide" / "methods.md"
BEGIN, END = "<!-- BEGIN GENERATED: methods -->", "<!-- END GENERATED: methods -->"
QBEGIN, QEND = "<!-- BEGIN GENERATED: quality -->", "<!-- END GENERATED: quality -->"

#: public modules, in the order the reference presents them
MODULES = [
    "marginalize.inference.registry",
    "marginalize.posterior",
    "marginalize.core.info",
    "marginalize.models.builders",
    "marginalize.models.cnn",
    "marginalize.models.module",
    "marginalize.models.priors",
    "marginalize.models.likelihoods",
    "marginalize.models.base",
    "marginalize.temperature",
    "marginalize.inference.engines.checkpoint",
    "marginalize.inference.engines.training",
    "marginalize.inference.engines.options",
    "marginalize.core.approximations",
    "marginalize.core.linearized",
    "marginalize.io",
    "marginalize.datasets",
    "marginalize.diagnostics.report",
    "marginalize.diagnostics.evaluation",
    "marginalize.core.arviz",
    "marginalize.diagnostics.stats",
    "marginalize.diagnostics.checks",
    "marginalize.diagnostics.metrics",
    "marginalize.diagnostics.functions",
    "marginalize.diagnostics.function_plots",
    "marginalize.diagnostics.plots",
    "marginalize._validation",
]

_SECTION = re.compile(r"^([A-Z][A-Za-z ]+)\n-{3,}$", re.M)
_LIST_SECTIONS = {
    "Parameters",
    "Returns",
    "Yields",
    "Raises",
    "Attributes",
    "Other Parameters",
    "Warns",
    "Receives",
}


# ---- docstrings -> markdown ---------------------------------------------------------------
def _inline(text: str) -> str:
    """reST inline markup -> markdown: ``x`` -> `x`, :func:`~a.b` -> `b`."""
    text = re.sub(
        r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`",
        lambda m: f"`{m.group(1).split('.')[-1] if '~' in m.group(0) else m.group(1)}`",
        text,
    )
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _code_blocks(lines: list[str]) -> list[str]:
    """Wrap doctest runs (``>>>`` and their output) and ``::`` literal blocks in fences."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            out.append("```python")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i].strip())
                i += 1
            out.append("```")
            continue
        if line.rstrip().endswith("::") and i + 1 < len(lines):
            out.append(_inline(line.rstrip()[:-1]))
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            out += ["", "```", *textwrap.dedent("\n".join(block)).splitlines(), "```", ""]
            continue
        out.append(_inline(line))
        i += 1
    return out


def _param_list(body: str) -> list[str]:
    """``name : type`` lines with indented descriptions -> a bullet list."""
    items: list[list[str]] = []
    for line in body.splitlines():
        if not line.strip():
            continue
        if not line.startswith((" ", "\t")):
            head, _, typ = line.partition(" : ")
            items.append([f"`{head.strip()}`" + (f" ({_inline(typ.strip())})" if typ else "")])
        elif items:
            items[-1].append(_inline(line.strip()))
        else:
            items.append([_inline(line.strip())])
    return [f"- {item[0]}" + (": " + " ".join(item[1:]) if len(item) > 1 else "") for item in items]


def doc_to_md(doc: str | None) -> str:
    if not doc:
        return ""
    doc = inspect.cleandoc(doc)
    parts = _SECTION.split(doc)
    out = _code_blocks(parts[0].splitlines())
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        out += ["", f"**{title}**", ""]
        body = body.strip("\n")
        if title in _LIST_SECTIONS:
            out += _param_list(body)
        else:
            out += _code_blocks(body.splitlines())
    return "\n".join(out).strip() + "\n"


# ---- signatures ---------------------------------------------------------------------------
def _annotation(a) -> str:
    if a is inspect.Parameter.empty:
        return ""
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _default(v) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(v))


def signature(name: str, obj, *, skip_self: bool = False) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"
    params, star_done = [], False
    plist = list(sig.parameters.values())
    if skip_self and plist and plist[0].name in ("self", "cls"):
        plist = plist[1:]
    for p in plist:
        if p.kind is p.KEYWORD_ONLY and not star_done:
            params.append("*")
            star_done = True
        s = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        ann = _annotation(p.annotation)
        if ann:
            s += f": {ann}"
        if p.default is not inspect.Parameter.empty:
            s += (" = " if ann else "=") + _default(p.default)
        params.append(s)
    ret = _annotation(sig.return_annotation)
    return f"{name}({', '.join(params)})" + (f" -> {ret}" if ret else "")


# ---- walking modules ----------------------------------------------------------------------
def _public_names(mod) -> list[str]:
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [
            n
            for n, v in vars(mod).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == mod.__name__
        ]
    return [
        n
        for n in names
        if (inspect.isfunction(getattr(mod, n, None)) or inspect.isclass(getattr(mod, n, None)))
        and getattr(getattr(mod, n), "__module__", None) == mod.__name__
    ]


def _class_members(cls) -> list[tuple[str, object, str]]:
    out = []
    for name, raw in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(raw, property):
            out.append((name, raw.fget, "property"))
        elif isinstance(raw, (classmethod, staticmethod)):
            out.append(
                (
                    name,
                    raw.__func__,
                    "classmethod" if isinstance(raw, classmethod) else "staticmethod",
                )
            )
        elif inspect.isfunction(raw):
            out.append((name, raw, "method"))
    return out


def _class_doc(cls) -> str:
    doc = cls.__doc__ or ""
    if dataclasses.is_dataclass(cls) and doc.startswith(cls.__name__ + "("):
        return ""  # the auto-generated dataclass docstring repeats the signature
    return doc


def render_object(mod_name: str, name: str, obj) -> list[str]:
    anchor = f"{mod_name}.{name}"
    if inspect.isclass(obj):
        init = obj.__init__ if "__init__" in vars(obj) or dataclasses.is_dataclass(obj) else None
        sig = signature(name, init, skip_self=True) if init is not None else f"{name}"
        sig = sig.removesuffix(" -> None")
        out = [
            f"### class `{anchor}`",
            "",
            "```python",
            f"class {sig}",
            "```",
            "",
            doc_to_md(_class_doc(obj)),
        ]
        for mname, fn, kind in _class_members(obj):
            if kind == "property":
                first = _inline(
                    inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].replace("\n", " ")
                )
                out += ["", f"- **`{mname}`** (property)" + (f": {first}" if first else "")]
                continue
            out += [
                "",
                f"#### `{name}.{mname}`",
                "",
                "```python",
                ("@" + kind + "\n" if kind != "method" else "")
                + "def "
                + signature(mname, fn, skip_self=kind != "staticmethod"),
                "```",
                "",
                doc_to_md(fn.__doc__),
            ]
        return out + [""]
    return [
        f"### `{anchor}`",
        "",
        "```python",
        "def " + signature(name, obj),
        "```",
        "",
        doc_to_md(obj.__doc__),
        "",
    ]


def render_api() -> str:
    import marginalize as mz

    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `tools/gen_api_docs.py` (`make docs`); "
        "do not edit by hand.",
        "",
        "## Top level: `import marginalize as mz`",
        "",
        "| name | defined in |",
        "|---|---|",
    ]
    top = list(mz.__all__) + sorted(getattr(mz, "_LAZY", {}))
    for n in top:
        try:
            obj = getattr(mz, n)
        except Exception:  # a lazily imported name whose module is missing in this build
            continue
        where = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", "")
        lines.append(f"| `mz.{n}` | `{where}` |")
    lines += ["", "Modules: " + ", ".join(f"[`{m}`](#{m.replace('.', '')})" for m in MODULES), ""]
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        lines += [f"## {mod_name}", "", doc_to_md(mod.__doc__), ""]
        for name in _public_names(mod):
            lines += render_object(mod_name, name, getattr(mod, name))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


# ---- the methods table --------------------------------------------------------------------
def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _option_docs(options_cls) -> list[str]:
    """Docstrings of an ``Options`` dataclass and of the option sets it inherits, own first."""
    docs: list[str] = []
    for klass in options_cls.__mro__:
        if klass is object:
            continue
        doc = inspect.cleandoc(_class_doc(klass))
        if doc and doc not in docs:
            docs.append(doc)
    return docs


_NUMPY_ITEM = re.compile(r"^(\w+(?:, \w+)*) : (.*)$")


def parse_option_docs(doc: str, names: list[str]) -> tuple[dict[str, str], str]:
    """Per-option descriptions from an ``Options`` docstring, and its leading text.

    Understands numpy-style items (``name : type`` then an indented description; ``a, b : t``
    documents both) and the inline form ``name : description; name : description; name; ...``.
    """
    found: dict[str, str] = {}
    intro: list[str] = []
    lines = doc.splitlines()
    inline_style = re.search(r";\s+\w+ : ", doc) is not None
    i = 0
    while i < len(lines) and inline_style:
        intro.append(lines[i])
        i += 1
    while i < len(lines):
        m = _NUMPY_ITEM.match(lines[i])
        if m and "; " not in lines[i] and all(n in names for n in m.group(1).split(", ")):
            desc = [m.group(2).strip()]
            i += 1
            while i < len(lines) and lines[i].startswith((" ", "\t")):
                desc.append(lines[i].strip())
                i += 1
            text = desc[0] + (": " + " ".join(desc[1:]) if len(desc) > 1 else "")
            for n in m.group(1).split(", "):
                found.setdefault(n, text)
            continue
        intro.append(lines[i])
        i += 1
    rest: list[str] = []
    for para in "\n".join(intro).split("\n\n"):
        flat = " ".join(para.split())
        pieces = flat.split("; ")
        head = re.match(r"^(\w+)(?: : (.*))?$", pieces[0])
        if not (head and head.group(1) in names) and not any(
            re.match(rf"^{re.escape(n)}(?: : |$)", pc) for pc in pieces[1:] for n in names
        ):
            rest.append(flat)
            continue
        current = None
        for pc in pieces:
            m = re.match(r"^(\w+)(?: : (.*))?$", pc, re.S)
            if m and m.group(1) in names:
                current = m.group(1)
                found.setdefault(current, (m.group(2) or "").strip())
            elif current is not None:
                found[current] = (found[current] + "; " + pc).strip("; ")
            else:
                rest.append(pc)
    return found, "\n\n".join(r for r in rest if r)


def render_methods_block() -> str:
    import marginalize as mz
    from marginalize.inference import get_method

    rows = mz.method_info().values()
    out = [
        BEGIN,
        "",
        "<!-- generated by tools/gen_api_docs.py from mz.method_info(); run `make docs` -->",
        "",
        "| method | what it is | cost | reference |",
        "|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"[`{r['name']}`](#{r['name']})",
            *(_cell(r[k]) for k in ("summary", "cost", "reference")),
        ]
        out.append("| " + " | ".join(cells) + " |")
    for r in rows:
        cls = get_method(r["name"])
        names = list(r["options"])
        descs: dict[str, str] = {n: d for n, d in r.get("docs", {}).items() if d}
        intro = ""
        for k, doc in enumerate(_option_docs(cls.Options)):
            found, rest = parse_option_docs(doc, names)
            for n, d in found.items():
                if d and not descs.get(n):
                    descs[n] = d
            if k == 0:
                intro = rest
        out += ["", f"### `{r['name']}`", "", _cell(r["summary"])]
        if intro:
            out += ["", _inline(_cell(intro))]
        out += ["", "| option | default | meaning |", "|---|---|---|"]
        out += [
            f"| `{k}` | `{_default(v)}` | {_inline(_cell(descs.get(k, '')))} |"
            for k, v in r["options"].items()
        ]
    out += ["", END]
    return "\n".join(out)


def render_quality_block() -> str:
    """The quality table: every method at its defaults against the committed NUTS references
    (``benchmarks/results/reference.jsonl`` and ``reference/``)."""
    from marginalize.benchmarks import reference

    results = ROOT / "benchmarks" / "results"
    return "\n".join(
        [
            QBEGIN,
            "",
            "<!-- generated by tools/gen_api_docs.py from benchmarks/results/reference.jsonl; "
            "run `make docs` -->",
            "",
            reference.guide_markdown(results, results / "reference.jsonl"),
            "",
            QEND,
        ]
    )


def _replace_block(current: str, begin: str, end: str, block: str) -> str:
    if begin not in current or end not in current:
        raise SystemExit(f"{METHODS_PATH}: the markers {begin} / {end} are missing")
    head, rest = current.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + block + tail


def render_methods(current: str) -> str:
    text = _replace_block(current, BEGIN, END, render_methods_block())
    return _replace_block(text, QBEGIN, QEND, render_quality_block())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = ap.parse_args(argv)
    targets = {
        API_PATH: render_api(),
        METHODS_PATH: render_methods(METHODS_PATH.read_text(encoding="utf-8")),
    }
    stale = [
        p for p, text in targets.items() if not p.exists() or p.read_text(encoding="utf-8") != text
    ]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run `make docs`", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(targets[p], encoding="utf-8")
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
