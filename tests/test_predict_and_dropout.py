import pytest
import torch

import marginalize as mz
from conftest import rseed
from test_contract import CLS, REG, cls_data, reg_data


def as_plain_function(model):
    """The same model seen as a plain Pyro function (forces the loop prediction path)."""

    def fn(x, y=None):
        return model(x, y)

    return fn


@pytest.mark.parametrize(
    "method,opts", [("svi-meanfield", {"steps": 50}), ("mc-dropout", {"steps": 50, "p": 0.2})]
)
def test_vectorized_prediction_equals_loop(method, opts):
    x, y = reg_data()
    post = mz.fit(REG, x, y, method=method, seed=0, progress=False, **opts)
    plain = mz.Posterior(
        as_plain_function(REG),
        post.layout,
        post.approximation,
        method=method,
        task=post.task,
        data=post.data,
        seed=post.seed,
    )
    xt = torch.randn(9, 2)
    # S != N on purpose (DESIGN pitfall: S == N hides broadcasting bugs)
    a = post.predict(xt, num_samples=23, seed=5, chunk_size=4)
    b = plain.predict(xt, num_samples=23, seed=5)
    for f in ("mean", "std", "epistemic", "aleatoric"):
        assert torch.allclose(getattr(a, f), getattr(b, f), atol=1e-5), f
    yt = torch.randn(9)
    assert torch.allclose(
        post.log_likelihood(xt, yt, 23, seed=5), plain.log_likelihood(xt, yt, 23, seed=5), atol=1e-5
    )


def test_vectorized_classification_equals_loop():
    x, y = cls_data()
    post = mz.fit(CLS, x, y, method="svi-meanfield", seed=0, steps=50, progress=False)
    plain = mz.Posterior(
        as_plain_function(CLS),
        post.layout,
        post.approximation,
        method="m",
        task="classification",
        data=post.data,
        num_classes=3,
    )
    xt = torch.randn(6, 2)
    a, b = post.predict(xt, 17, seed=1), plain.predict(xt, 17, seed=1)
    assert torch.allclose(a.probs, b.probs, atol=1e-6)
    assert torch.allclose(a.mutual_info, b.mutual_info, atol=1e-5)


def test_chunking_does_not_change_results():
    x, y = reg_data()
    post = mz.fit(REG, x, y, method="svi-meanfield", seed=0, steps=30, progress=False)
    xt = torch.randn(11, 2)
    a = post.predict(xt, 50, seed=2, chunk_size=1)
    b = post.predict(xt, 50, seed=2, chunk_size=50)
    assert torch.allclose(a.mean, b.mean, atol=1e-6) and torch.allclose(a.std, b.std, atol=1e-5)
    d = post.predict(xt, 50, seed=2, return_draws=True).draws
    assert d["mean"].shape == (1, 50, 11)
    assert torch.allclose(d["mean"].mean((0, 1)), a.mean, atol=1e-6)


def test_mc_dropout_varies_with_masks_and_is_deterministic_at_p0():
    x, y = reg_data()
    post = mz.fit(REG, x, y, method="mc-dropout", p=0.3, steps=100, seed=0, progress=False)
    pred = post.predict(torch.randn(5, 2), num_samples=64, seed=0, return_draws=True)
    assert torch.all(pred.epistemic > 0)
    assert pred.draws["mean"].std(1).min() > 0
    post0 = mz.fit(REG, x, y, method="mc-dropout", p=0.0, steps=100, seed=0, progress=False)
    xt = torch.randn(5, 2)
    a = post0.predict(xt, num_samples=64, seed=0)
    b = post0.predict(xt, num_samples=64, seed=1)
    assert torch.equal(a.mean, b.mean) and torch.all(a.epistemic == 0)


def test_mc_dropout_masks_input_units_of_weight_matrices():
    x, y = reg_data()
    post = mz.fit(REG, x, y, method="mc-dropout", p=0.5, steps=20, seed=0, progress=False)
    draws = post.sample(num_samples=200, seed=0)
    # by default the hidden units: the inputs of layer2, not the data's features
    assert not bool((draws["layer1.weight"] == 0).any())
    w2 = draws["layer2.weight"][0]  # (S, 8 hidden, 1 output)
    zero_rows = (w2 == 0).all(-1)
    assert 0.3 < zero_rows.float().mean() < 0.7
    post = mz.fit(
        REG, x, y, method="mc-dropout", p=0.5, steps=20, seed=0, input_dropout=True, progress=False
    )
    draws = post.sample(num_samples=200, seed=0)
    w = draws["layer1.weight"][0]  # (S, 2 inputs, 8 hidden)
    zero_rows = (w == 0).all(-1)  # a dropped input unit zeroes a whole row
    assert 0.3 < zero_rows.float().mean() < 0.7
    assert torch.all((w == 0).any(-1) == zero_rows)  # never partially zero
    assert torch.all(draws["layer1.bias"][0] == draws["layer1.bias"][0, :1])  # biases not masked


@pytest.mark.statistical
def test_minibatch_svi_scales_likelihood_to_full_data(float64):
    """With minibatches the MAP must land where the full-batch MAP does."""
    x, y = reg_data(n=64)
    model = mz.models.mlp(2, hidden=[], likelihood=mz.likelihoods.Gaussian(noise=0.3))
    phi = torch.cat([x, torch.ones(64, 1)], 1)
    mode = torch.linalg.solve(torch.eye(3) + phi.T @ phi / 0.09, phi.T @ y / 0.09)
    mini = mz.fit(
        model,
        x,
        y,
        method="map",
        steps=2000,
        lr=0.05,
        lr_final=0.001,
        batch_size=16,
        seed=rseed(),
        progress=False,
    )
    # minibatch noise leaves an O(lr_final) wobble around the mode
    assert torch.allclose(mini.approximation.loc, mode, atol=0.02), (mini.approximation.loc, mode)
    assert mini.approximation.loc[0].abs() > 0.5


def test_plain_pyro_model_function_is_accepted():
    import pyro
    import pyro.distributions as dist

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        s = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w + b, s), obs=y)

    x, y = reg_data()
    post = mz.fit(model, x, y, method="svi-meanfield", steps=200, seed=0, progress=False)
    assert post.layout.names == ["w", "b", "sigma"]
    assert (post.sample(50)["sigma"] > 0).all()
    pred = post.predict(x[:4], num_samples=10)
    assert pred.mean.shape == (4,)
