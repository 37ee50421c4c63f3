"""User-style models: the gallery of tests/test_gallery.py and bring_your_own_model.md.

Each model is written the way people write BNNs in Pyro and its neighbours (Pyro's tutorials,
NumPyro's examples ported to Pyro, TyXe-style modules, forum idioms), not the way marginalize's
builders write them. Each entry of :data:`GALLERY` builds ``(model, x, y, x_test, truth)`` from a
seed: tiny data, so that every model can be fitted by every method in the test suite. The docs
page shows the same code (``tests/test_gallery.py`` checks that it stays the same).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

import marginalize as mz

H = 8  # hidden units everywhere: small enough for NUTS in a test


# ---- 1. Pyro's regression tutorial: PyroModule + PyroSample, observation site "obs" ----------
class TutorialBNN(PyroModule):
    def __init__(self, in_dim=2, hid_dim=H, prior_scale=5.0):
        super().__init__()
        self.layer1 = PyroModule[nn.Linear](in_dim, hid_dim)
        self.layer2 = PyroModule[nn.Linear](hid_dim, 1)
        self.layer1.weight = PyroSample(
            dist.Normal(0.0, prior_scale).expand([hid_dim, in_dim]).to_event(2)
        )
        self.layer1.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([hid_dim]).to_event(1))
        self.layer2.weight = PyroSample(
            dist.Normal(0.0, prior_scale).expand([1, hid_dim]).to_event(2)
        )
        self.layer2.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([1]).to_event(1))

    def forward(self, x, y=None):
        mu = self.layer2(torch.tanh(self.layer1(x))).squeeze(-1)
        sigma = pyro.sample("sigma", dist.Gamma(0.5, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, sigma * sigma), obs=y)
        return mu


# ---- 2. NumPyro's bnn example in Pyro: batch-shaped weights (no .to_event), y of shape (N, 1) --
def numpyro_bnn(X, Y=None, D_H=H):
    D_X = X.shape[1]
    w1 = pyro.sample("w1", dist.Normal(torch.zeros(D_X, D_H), torch.ones(D_X, D_H)))
    z1 = torch.tanh(X @ w1)
    w2 = pyro.sample("w2", dist.Normal(torch.zeros(D_H, D_H), torch.ones(D_H, D_H)))
    z2 = torch.tanh(z1 @ w2)
    w3 = pyro.sample("w3", dist.Normal(torch.zeros(D_H, 1), torch.ones(D_H, 1)))
    z3 = z2 @ w3
    prec_obs = pyro.sample("prec_obs", dist.Gamma(3.0, 1.0))
    sigma_obs = 1.0 / torch.sqrt(prec_obs)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("Y", dist.Normal(z3, sigma_obs).to_event(1), obs=Y)


# ---- 3. TyXe style: an ordinary nn.Module made Bayesian --------------------------------------
def tyxe_style():
    net = nn.Sequential(nn.Linear(2, H), nn.Tanh(), nn.Linear(H, 1))
    return mz.models.bayesian(net, prior=mz.priors.Normal(1.0), likelihood="gaussian")


# ---- 4. Forum idioms: "obs", weights without .to_event, a plate over hidden units, a learned
#         noise scale and a pyro.deterministic site --------------------------------------------
def forum_model(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([x.shape[1], H]))
    with pyro.plate("hidden", H):
        b1 = pyro.sample("b1", dist.Normal(0.0, 1.0))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([H]))
    sigma = pyro.sample("sigma", dist.LogNormal(-1.0, 1.0))
    mean = pyro.deterministic("mean", torch.tanh(x @ w1 + b1) @ w2)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


# ---- 5-6. Classification: Bernoulli and Categorical with integer labels -----------------------
def logistic_bnn(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([x.shape[1], H]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1.0))
    logits = torch.tanh(x @ w1 + b1) @ w2 + b2
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def softmax_bnn(x, y=None, classes=3):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([x.shape[1], H]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([H, classes]).to_event(2))
    logits = torch.tanh(x @ w1 + b1) @ w2
    with pyro.plate("data", x.shape[0]):
        pyro.sample("label", dist.Categorical(logits=logits), obs=y)


# ---- 7. Counts: Poisson regression with a log link ------------------------------------------
def poisson_bnn(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([x.shape[1], H]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 0.5).expand([H]).to_event(1))
    b2 = pyro.sample("b2", dist.Normal(1.0, 1.0))
    rate = torch.exp(torch.tanh(x @ w1 + b1) @ w2 + b2)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("counts", dist.Poisson(rate), obs=y)


# ---- 8. Robust regression: Student-t with a learned df --------------------------------------
def student_t_regression(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    nu = pyro.sample("nu", dist.Gamma(2.0, 0.1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.StudentT(nu, x @ w + b, sigma), obs=y)


# ---- 9. Multi-output regression: y of shape (N, 2), one noise scale per output ----------------
def multi_output(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([x.shape[1], H]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([H, 2]).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0).expand([2]).to_event(1))
    f = torch.tanh(x @ w1 + b1) @ w2 + b2
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(f, sigma).to_event(1), obs=y)


# ---- 10. One input: x of shape (N,) --------------------------------------------------------
def curve_1d(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    f = torch.tanh(x[:, None] * w1 + b1) @ w2
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(f, sigma), obs=y)


# ---- 11-14. nn.Modules: BatchNorm, recurrent nets, token embeddings, a small CNN ---------------
def batchnorm_net():
    net = nn.Sequential(nn.Linear(2, H), nn.BatchNorm1d(H), nn.ReLU(), nn.Linear(H, 1))
    return mz.models.bayesian(net, prior=mz.priors.Normal(1.0), likelihood="gaussian")


class Recurrent(nn.Module):
    """A sequence regressor: the last hidden state of an LSTM or GRU, then a linear head."""

    def __init__(self, cell="gru", hidden=4):
        super().__init__()
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(input_size=1, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):  # x: (N, T, 1)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def recurrent_net(cell):
    return mz.models.bayesian(Recurrent(cell), prior=mz.priors.Normal(1.0), likelihood="gaussian")


class BagOfTokens(nn.Module):
    """Token ids (N, T) -> the mean of their embeddings -> class logits."""

    def __init__(self, vocab=12, dim=4, classes=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


class TinyCNN(nn.Module):
    """8x8 digit images (N, 1, 8, 8) -> 10 class logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3)
        self.fc = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x):
        h = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(h.flatten(1))


# ---- the data --------------------------------------------------------------------------------
@dataclass
class Case:
    """One gallery entry: the model and its data (``truth``: noise-free targets at ``x_test``
    for regression, labels for classification)."""

    name: str
    model: Callable
    x: object
    y: object
    x_test: object
    truth: torch.Tensor
    task: str
    out_shape: tuple[int, ...] = ()  # per-input shape of pred.mean (regression) past N
    num_classes: int | None = None


N, N_TEST = 40, 16


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _smooth(x):  # a function a tanh net fits well on [-2, 2]^2
    return torch.sin(1.5 * x[..., 0]) + 0.5 * x[..., 1]


def _reg2(seed, noise=0.1):
    g = _gen(seed)
    x = 2 * torch.rand(N, 2, generator=g) - 1
    xt = 2 * torch.rand(N_TEST, 2, generator=g) - 1
    return x, _smooth(x) + noise * torch.randn(N, generator=g), xt, _smooth(xt)


def _case_tutorial(seed):
    x, y, xt, ft = _reg2(seed)
    return Case("pyro_tutorial", TutorialBNN(), x, y, xt, ft, "regression")


def _case_numpyro(seed):
    x, y, xt, ft = _reg2(seed)
    return Case("numpyro_bnn", numpyro_bnn, x, y[:, None], xt, ft[:, None], "regression", (1,))


def _case_tyxe(seed):
    x, y, xt, ft = _reg2(seed)
    return Case("tyxe_module", tyxe_style(), x, y, xt, ft, "regression")


def _case_forum(seed):
    x, y, xt, ft = _reg2(seed)
    return Case("forum_idioms", forum_model, x, y, xt, ft, "regression")


def _case_bernoulli(seed):
    g = _gen(seed)
    x, xt = torch.randn(N, 2, generator=g), torch.randn(N_TEST, 2, generator=g)
    lab = lambda a: (a[:, 0] + a[:, 1] > 0).numpy().astype(np.int64)  # noqa: E731
    truth = torch.as_tensor(lab(xt))
    return Case(
        "bernoulli_int_labels",
        logistic_bnn,
        x.numpy(),
        lab(x),
        xt,
        truth,
        "classification",
        num_classes=2,
    )


def _case_categorical(seed):
    g = _gen(seed)
    x, xt = torch.randn(N, 2, generator=g), torch.randn(N_TEST, 2, generator=g)
    lab = lambda a: (a[:, 0] > 0).long() + (a[:, 1] > 0.5).long()  # noqa: E731
    return Case(
        "categorical_int_labels",
        softmax_bnn,
        x,
        lab(x),
        xt,
        lab(xt),
        "classification",
        num_classes=3,
    )


def _case_poisson(seed):
    g = _gen(seed)
    x = 2 * torch.rand(N, 2, generator=g) - 1
    xt = 2 * torch.rand(N_TEST, 2, generator=g) - 1
    rate = lambda a: torch.exp(1.0 + 0.5 * _smooth(a))  # noqa: E731
    counts = torch.poisson(rate(x), generator=g).to(torch.int64).numpy()
    return Case("poisson_counts", poisson_bnn, x, counts, xt, rate(xt), "regression")


def _case_student(seed):
    g = _gen(seed)
    x, xt = torch.randn(N, 1, generator=g), torch.linspace(-2, 2, N_TEST)[:, None]
    y = 0.8 * x[:, 0] + 0.1 * torch.randn(N, generator=g)
    y[::8] += 5.0  # outliers: why one reaches for a Student-t
    return Case("student_t", student_t_regression, x, y, xt, 0.8 * xt[:, 0], "regression")


def _case_multi(seed):
    g = _gen(seed)
    x = 2 * torch.rand(N, 2, generator=g) - 1
    xt = 2 * torch.rand(N_TEST, 2, generator=g) - 1
    f = lambda a: torch.stack([_smooth(a), torch.cos(a[:, 0]) - a[:, 1]], -1)  # noqa: E731
    y = f(x) + 0.1 * torch.randn(N, 2, generator=g)
    return Case("multi_output", multi_output, x, y, xt, f(xt), "regression", (2,))


def _case_1d(seed):
    g = _gen(seed)
    x, xt = 4 * torch.rand(N, generator=g) - 2, torch.linspace(-2, 2, N_TEST)
    y = torch.sin(1.5 * x) + 0.1 * torch.randn(N, generator=g)
    return Case("x_1d", curve_1d, x, y, xt, torch.sin(1.5 * xt), "regression")


def _case_pandas(seed):
    x, y, xt, ft = _reg2(seed)
    cols = ["temperature", "pressure"]
    df, df_test = pd.DataFrame(x.numpy(), columns=cols), pd.DataFrame(xt.numpy(), columns=cols)
    return Case(
        "pandas_numpy",
        forum_model,
        df,
        pd.Series(y.numpy(), name="target"),
        df_test,
        ft,
        "regression",
    )


def _case_batchnorm(seed):
    x, y, xt, ft = _reg2(seed)
    return Case("batchnorm_module", batchnorm_net(), x, y, xt, ft, "regression")


def _sequences(seed):
    g = _gen(seed)
    x, xt = torch.randn(N, 5, 1, generator=g), torch.randn(N_TEST, 5, 1, generator=g)
    f = lambda a: 0.5 * a[:, -1, 0] + 0.3 * a[:, -2, 0]  # noqa: E731
    return x, f(x) + 0.05 * torch.randn(N, generator=g), xt, f(xt)


def _case_gru(seed):
    return Case("gru_module", recurrent_net("gru"), *_sequences(seed), "regression")


def _case_lstm(seed):
    return Case("lstm_module", recurrent_net("lstm"), *_sequences(seed), "regression")


def _case_embedding(seed):
    g = _gen(seed)
    tok = torch.randint(0, 12, (N, 6), generator=g)
    tok_t = torch.randint(0, 12, (N_TEST, 6), generator=g)
    lab = lambda t: ((t < 6).sum(1) > 3).long()  # noqa: E731
    model = mz.models.bayesian(BagOfTokens(), prior=mz.priors.Normal(1.0), likelihood="categorical")
    return Case(
        "embedding_module", model, tok, lab(tok), tok_t, lab(tok_t), "classification", num_classes=2
    )


def _case_cnn(seed):
    ds = mz.datasets.load("digits")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(ds.y))[: N + N_TEST]
    x = torch.as_tensor(ds.x[idx], dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.as_tensor(ds.y[idx])
    model = mz.models.bayesian(TinyCNN(), prior=mz.priors.Normal(1.0), likelihood="categorical")
    return Case("cnn_digits", model, x[:N], y[:N], x[N:], y[N:], "classification", num_classes=10)


def _seeded(build: Callable[[int], Case]) -> Callable[[int], Case]:
    """``build`` with torch's global generator seeded from the case's seed (and restored after):
    a wrapped ``nn.Module``'s own initialization is its fit's start (``init="auto"``), so a
    case must not depend on which tests ran before it in the process."""

    def seeded(seed: int) -> Case:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + seed)
            return build(seed)

    return seeded


#: name -> builder of the case from a seed
GALLERY: dict[str, Callable[[int], Case]] = {
    "pyro_tutorial": _seeded(_case_tutorial),
    "numpyro_bnn": _seeded(_case_numpyro),
    "tyxe_module": _seeded(_case_tyxe),
    "forum_idioms": _seeded(_case_forum),
    "bernoulli_int_labels": _seeded(_case_bernoulli),
    "categorical_int_labels": _seeded(_case_categorical),
    "poisson_counts": _seeded(_case_poisson),
    "student_t": _seeded(_case_student),
    "multi_output": _seeded(_case_multi),
    "x_1d": _seeded(_case_1d),
    "pandas_numpy": _seeded(_case_pandas),
    "batchnorm_module": _seeded(_case_batchnorm),
    "gru_module": _seeded(_case_gru),
    "lstm_module": _seeded(_case_lstm),
    "embedding_module": _seeded(_case_embedding),
    "cnn_digits": _seeded(_case_cnn),
}
