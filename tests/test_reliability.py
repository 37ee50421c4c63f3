"""Reliability: failing fits keep what they reached, interrupted fits resume exactly, files are
verified on load, and the same seed gives bitwise the same result for every method."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pyro
import pytest
import torch

import marginalize as mz
from conftest import tiny_options
from marginalize._files import digest, write_verified

METHODS = mz.methods()
MODEL = mz.models.mlp(1, hidden=[3], activation="tanh")


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)


X, Y = data()


# Non-finite losses, Ctrl-C, checkpoints and resume: tests/test_engine.py and tests/test_contract.py


# ---- 3. files -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_posterior(tmp_path_factory):
    post = mz.fit(
        MODEL,
        X,
        Y,
        method="nuts",
        num_samples=10,
        num_warmup=10,
        num_chains=1,
        max_tree_depth=3,
        progress=False,
    )
    path = tmp_path_factory.mktemp("files") / "post.pt"
    post.save(path)
    return post, path


def _same(a: mz.Posterior, b: mz.Posterior) -> bool:
    return torch.equal(a.approximation.draws, b.approximation.draws) and a.method == b.method


def test_every_flipped_byte_is_caught_or_harmless(saved_posterior, tmp_path):
    post, path = saved_posterior
    raw = path.read_bytes()
    bad = tmp_path / "bad.pt"
    caught = harmless = 0
    for pos in range(0, len(raw), max(1, len(raw) // 400)):
        data = bytearray(raw)
        data[pos] ^= 0x5A
        bad.write_bytes(bytes(data))
        try:
            loaded = mz.load(bad)
        except mz.FileFormatError:
            caught += 1
            continue
        assert _same(loaded, post), f"byte {pos}: a corrupted file loaded as a different posterior"
        harmless += 1
    assert caught > harmless  # most bytes matter; the rest (zip padding) do not change content


def test_flipped_tensor_byte_is_caught_by_the_checksum(saved_posterior, tmp_path):
    """Find the draws' bytes in the file and flip one: only the SHA-256 can notice."""
    post, path = saved_posterior
    raw = path.read_bytes()
    needle = post.approximation.draws.contiguous().numpy().tobytes()[:64]
    pos = raw.find(needle)
    assert pos > 0
    data = bytearray(raw)
    data[pos + 5] ^= 0x01
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(mz.FileFormatError, match="SHA-256 checksum: the file is corrupted"):
        mz.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -1])
def test_truncated_file(saved_posterior, tmp_path, keep):
    raw = saved_posterior[1].read_bytes()
    n = (
        int(len(raw) * keep)
        if isinstance(keep, float)
        else (keep if keep >= 0 else len(raw) + keep)
    )
    (tmp_path / "t.pt").write_bytes(raw[:n])
    with pytest.raises(mz.FileFormatError, match="cannot be read"):
        mz.load(tmp_path / "t.pt")


def test_other_version_and_foreign_files(tmp_path):
    write_verified({"format": "marginalize.posterior", "version": 1}, tmp_path / "old.pt")
    with pytest.raises(
        mz.FileFormatError, match="version 1; this version of marginalize reads version 2"
    ):
        mz.load(tmp_path / "old.pt")
    torch.save({"a": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(mz.FileFormatError, match="not a marginalize posterior file"):
        mz.load(tmp_path / "other.pt")
    with pytest.raises(mz.FileFormatError, match="not a marginalize checkpoint"):
        mz.resume(tmp_path / "other.pt", MODEL, X, Y)
    with pytest.raises(FileNotFoundError):
        mz.load(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def test_loading_never_runs_code_from_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({"format": "marginalize.posterior", "version": 2, "x": _Evil()}, f)
    torch.save({"format": "marginalize.checkpoint", "version": 1, "x": _Evil()}, "evil.ckpt")
    with pytest.raises(mz.FileFormatError):
        mz.load("evil.pt")
    with pytest.raises(mz.FileFormatError):
        mz.resume("evil.ckpt", MODEL, X, Y)
    assert not os.path.exists("EVIL_RAN")


def test_corrupted_checkpoint(tmp_path):
    path = tmp_path / "fit.ckpt"
    mz.fit(MODEL, X, Y, method="map", steps=20, checkpoint=path, checkpoint_every=5, progress=False)
    raw = path.read_bytes()
    for cut in (len(raw) // 3, len(raw) - 2):
        (tmp_path / "cut.ckpt").write_bytes(raw[:cut])
        with pytest.raises(mz.FileFormatError):
            mz.resume(tmp_path / "cut.ckpt", MODEL, X, Y, progress=False)
    params = torch.load(path, weights_only=True)["segments"]["0:train"]["state"]["result"]["params"]
    needle = params.numpy().tobytes()
    pos = raw.find(needle)
    assert pos > 0
    data = bytearray(raw)
    data[pos] ^= 0x10
    (tmp_path / "flip.ckpt").write_bytes(bytes(data))
    with pytest.raises(mz.FileFormatError, match="checksum"):
        mz.resume(tmp_path / "flip.ckpt", MODEL, X, Y, progress=False)


def test_digest_sees_every_kind_of_change():
    base = {"a": torch.arange(4.0), "b": [1, 2.5, "s", None, True], "c": {"d": torch.ones(2, 2)}}
    d0 = digest(base)
    assert (
        digest(
            {"c": {"d": torch.ones(2, 2)}, "b": [1, 2.5, "s", None, True], "a": torch.arange(4.0)}
        )
        == d0
    )
    changes = [
        {**base, "a": torch.tensor([0.0, 1.0, 2.0, 3.0000002])},
        {**base, "a": torch.arange(4.0).double()},
        {**base, "a": torch.arange(4.0).reshape(2, 2)},
        {**base, "b": [1, 2.5, "t", None, True]},
        {**base, "b": [1.0, 2.5, "s", None, True]},
        {**base, "b": (1, 2.5, "s", None, True)},
        {**base, "c": {"e": torch.ones(2, 2)}},
    ]
    assert len({digest(c) for c in changes} | {d0}) == len(changes) + 1


# ---- 4. determinism --------------------------------------------------------------------------
TINIER = {
    "num_samples": 8,
    "num_warmup": 8,
    "num_chains": 1,
    "max_tree_depth": 3,
    "steps": 30,
    "pretrain_steps": 30,
    "swag_steps": 20,
}


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_bitwise_same_result_and_no_leaks(method):
    opts = tiny_options(method)
    opts.update({k: v for k, v in TINIER.items() if k in opts})
    xt = torch.linspace(-2, 2, 7)[:, None]
    a = mz.fit(MODEL, X, Y, method=method, seed=11, progress=False, **opts)
    # disturb every global RNG and the param store; the fit must not care and must not leak
    torch.manual_seed(123)
    np.random.seed(7)  # noqa: NPY002 - the legacy global state is what must not leak
    random.seed(9)
    pyro.param("stray", torch.ones(3))
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    b = mz.fit(MODEL, X, Y, method=method, seed=11, progress=False, **opts)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])  # noqa: NPY002
    assert random.getstate() == states[2]
    assert "stray" in pyro.get_param_store()
    pyro.clear_param_store()
    pa, pb = a.predict(xt, num_samples=9, seed=2), b.predict(xt, num_samples=9, seed=2)
    assert torch.equal(pa.mean, pb.mean) and torch.equal(pa.std, pb.std)
    c = mz.fit(MODEL, X, Y, method=method, seed=12, progress=False, **opts)
    assert not torch.equal(c.predict(xt, num_samples=9, seed=2).mean, pa.mean)
