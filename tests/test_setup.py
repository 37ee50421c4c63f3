"""Set-up beyond this machine: the Makefile's default torch build exists on the public registry."""

import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = "https://pypi.org/simple/torch/"


def makefile_default(name: str) -> str:
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{name}\s*\?=\s*(.*)$", text, flags=re.M)
    assert m, f"{name} has no default in the Makefile"
    return m.group(1).strip()


def test_makefile_torch_spec_is_a_plain_registry_pin():
    """No local version label (``+cpu``): those exist only on PyTorch's own index."""
    spec = makefile_default("TORCH_SPEC")
    m = re.fullmatch(r"torch==(\d+\.\d+\.\d+)", spec)
    assert m, f"TORCH_SPEC ?= {spec!r}: expected torch==X.Y.Z (no +local label)"
    readme = (ROOT / "README.md").read_text()
    assert spec in readme and "TORCH_PIP_ARGS" in readme  # how to choose a CPU or CUDA build


def _registry_files() -> list[str]:
    req = urllib.request.Request(
        REGISTRY, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return [f["filename"] for f in json.load(r)["files"]]
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        pytest.skip(f"the registry ({REGISTRY}) cannot be reached: {e}")


def test_makefile_torch_spec_exists_on_the_registry():
    version = makefile_default("TORCH_SPEC").split("==", 1)[1]
    files = _registry_files()
    wheels = [f for f in files if f.startswith(f"torch-{version}-") and f.endswith(".whl")]
    assert wheels, f"torch {version} is not on {REGISTRY}"
    # a wheel for the Python running the tests, on Linux x86-64 (this project's machines)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert any(tag in w and "manylinux" in w and "x86_64" in w for w in wheels), (tag, wheels)
