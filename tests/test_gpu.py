"""GPU: fitting, prediction and function sampling stay on the device of the data.

Every test needs CUDA and is skipped cleanly without it (``-m gpu`` selects them).
"""

import numpy as np
import pytest
import torch
from torch import nn

import marginalize as mz
from marginalize.diagnostics.functions import posterior_functions, prior_functions, sample_prior

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

P = mz.priors


@pytest.fixture
def cuda():
    return torch.device("cuda")


def test_sample_prior_and_prior_functions_on_cuda(cuda):
    m = mz.models.mlp(1, hidden=[16], prior={"layer1": P.Hierarchical(), "layer2": P.Normal(1.0)})
    x = torch.linspace(-2, 2, 100, device=cuda)[:, None]
    draws = sample_prior(m, 50, x, torch.Generator(device=cuda).manual_seed(0))
    assert all(v.device.type == "cuda" for v in draws.values())
    a = prior_functions(m, x, num_samples=2000, seed=1)
    b = prior_functions(m, x, num_samples=2000, seed=1)
    assert a.f.device.type == "cuda" and torch.equal(a.f, b.f)
    # same distribution as on the CPU (different random streams): compare the spread of f
    c = prior_functions(m, x.cpu(), num_samples=2000, seed=1)
    ratio = (a.std().cpu() / c.std()).mean()
    assert 0.85 < float(ratio) < 1.15


def test_cnn_forward_cuda_matches_cpu(cuda):
    m = mz.models.cnn(1, 8, channels=[4, 8], hidden=[16], num_classes=10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, dtype=torch.float64, generator=g)
    ps = sample_prior(m, 20, x, g)
    cpu = m.forward(ps, x)
    gpu = m.forward({k: v.to(cuda) for k, v in ps.items()}, x.to(cuda))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)


def test_module_model_on_cuda_inputs(cuda):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))  # stays on the CPU
    m = mz.models.bayesian(net, likelihood="categorical", sites=["2"])
    x = torch.randn(10, 3)
    m.check_input(x.to(cuda))
    out = m.forward(m.module_params(cuda), x.to(cuda))
    assert out.device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(out.cpu(), net(x), rtol=1e-5, atol=1e-5)
    pf = prior_functions(m, x.to(cuda), num_samples=30)
    assert pf.f.device.type == "cuda" and pf.f.shape == (1, 30, 10, 2)


@pytest.mark.parametrize("method", ["map", "svi-meanfield", "mc-dropout"])
def test_fit_predict_functions_end_to_end_on_cuda(method, cuda, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 2))
    y = x[:, 0] - 2 * x[:, 1] + 0.1 * rng.normal(size=80)
    post = mz.fit(
        mz.models.mlp(2, hidden=[16]), x, y, method=method, steps=50, device="cuda", progress=False
    )
    assert post.device.type == "cuda"
    xt = torch.as_tensor(x[:7], dtype=torch.float32, device=cuda)
    pred = post.predict(xt, num_samples=40)
    assert pred.mean.device.type == "cuda"
    fx = posterior_functions(post, xt, num_samples=40)
    assert fx.f.device.type == "cuda"
    assert fx.to_xarray()["f"].shape[2:] == (7, 1)
    post.save(tmp_path / "p.pt")
    back = mz.load(tmp_path / "p.pt", device="cuda")
    assert back.predict(xt, num_samples=5).mean.device.type == "cuda"


def test_cnn_fit_on_cuda(cuda):
    ds = mz.datasets.load("digits")
    x = torch.tensor(ds.x[:200], dtype=torch.float32, device=cuda).reshape(-1, 1, 8, 8)
    y = torch.tensor(ds.y[:200], device=cuda)
    m = mz.models.cnn(1, 8, channels=[8], hidden=[32], num_classes=10, prior=P.ScaledNormal())
    post = mz.fit(m, x, y, method="svi-meanfield", steps=100, progress=False)
    pred = post.predict(x, num_samples=20)
    assert pred.probs.device.type == "cuda"
    fx = posterior_functions(post, x[:16], num_samples=20)
    assert fx.probs().device.type == "cuda"
