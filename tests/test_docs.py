"""The generated docs (docs/api.md, the methods table in docs/guide/methods.md) match the code.

If this fails after you changed a docstring or a method's options: run ``make docs``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location(
        "gen_api_docs", ROOT / "tools" / "gen_api_docs.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_docs_are_up_to_date(gen, capsys):
    rc = gen.main(["--check"])
    assert rc == 0, capsys.readouterr().err + " (run `make docs`)"


def test_methods_table_lists_every_method_and_option(gen):
    import marginalize as mz

    block = gen.render_methods_block()
    for row in mz.method_info().values():
        assert f"### `{row['name']}`" in block
        section = block.split(f"### `{row['name']}`", 1)[1].split("\n### ", 1)[0]
        for opt, default in row["options"].items():
            assert re.search(
                rf"\| `{re.escape(opt)}` \| `{re.escape(gen._default(default))}` \|", section
            ), (row["name"], opt)


def test_api_covers_the_top_level(gen):
    import marginalize as mz

    api = gen.render_api()
    for name in (
        "fit",
        "methods",
        "method_info",
        "load",
        "report",
        "prior_functions",
        "temperature_scale",
    ):
        assert f"`mz.{name}`" in api
    assert "### `marginalize.inference.registry.fit`" in api
    assert "def fit(model: Callable, x, y=None, method: str | None = None, *, n: int" in api
    assert " at 0x" not in api  # no memory addresses: the output must be reproducible
    assert (
        "### class `marginalize.posterior.Posterior`" in api and "#### `Posterior.predict`" in api
    )
    assert mz.__all__


def test_option_docstrings_are_parsed_in_both_styles(gen):
    numpy_style = """Options of x.

    steps : int
        Number of steps
        (default 10).
    lr, lr_final : float
        Learning rates.
    """
    found, intro = gen.parse_option_docs(
        gen.inspect.cleandoc(numpy_style), ["steps", "lr", "lr_final"]
    )
    assert found == {
        "steps": "int: Number of steps (default 10).",
        "lr": "float: Learning rates.",
        "lr_final": "float: Learning rates.",
    }
    assert intro == "Options of x."
    inline = (
        "Shared.\n\nsteps : number of steps; clip : a clip (None: none; else a float);\n"
        "flag; lr : rate."
    )
    found, intro = gen.parse_option_docs(inline, ["steps", "clip", "flag", "lr"])
    assert found == {
        "steps": "number of steps",
        "clip": "a clip (None: none; else a float)",
        "flag": "",
        "lr": "rate.",
    }
    assert intro == "Shared."


def test_docstring_conversion(gen):
    md = gen.doc_to_md("""Do a thing with ``x`` (see :func:`~marginalize.fit`).

    Parameters
    ----------
    x : int
        The input.

    Examples
    --------
    >>> 1 + 1
    2
    """)
    assert md.startswith("Do a thing with `x` (see `fit`).")
    assert "**Parameters**\n\n- `x` (int): The input." in md
    assert "```python\n>>> 1 + 1\n2\n```" in md
