"""K-FAC Laplace of dense and convolutional layers (``engines/kfac.py``) and last-layer Laplace
of any module: known answers (one dense layer: K-FAC is the exact GGN; a small conv net's
factors against a brute-force unfold; the last layer's k x k precision against the full GGN's
block from autograd Jacobians), float32 factors against float64 ones, and predictions."""

import math

import pytest
import torch
from torch import nn

import marginalize as mz
from marginalize.inference.engines import kfac

# ---- helpers -------------------------------------------------------------------------------


def _softmax_factor(f, x, y):
    """``L`` with ``L L^T = diag(p) - p p^T``, the softmax cross-entropy's output Hessian."""
    p = torch.softmax(f, -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    lam, q = torch.linalg.eigh(h)
    return q * lam.clamp_min(0).sqrt().unsqueeze(1)


def _offsets(params, names):
    """Offsets of ``names`` in a flat vector of ``params`` laid out in that order."""
    out, o = {}, 0
    for name in names:
        out[name] = o
        o += params[name].numel()
    return out


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 4, 4)
    )


def _patches_by_hand(x, k, pad):
    """Patches ``(N, L, C k k)`` of ``x`` ``(N, C, H, W)`` by explicit loops (channels-major)."""
    n, c, h, w = x.shape
    xp = torch.zeros(n, c, h + 2 * pad, w + 2 * pad, dtype=x.dtype)
    xp[:, :, pad : pad + h, pad : pad + w] = x
    rows = []
    for i in range(h):
        for j in range(w):
            rows.append(xp[:, :, i : i + k, j : j + k].reshape(n, -1))
    return torch.stack(rows, 1)


# ---- known answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["builder", "module"])
def test_one_dense_layer_kron_is_the_exact_ggn(float64, kind):
    """Gaussian likelihood, one dense layer with one output: ``A (x) G`` is ``Phi^T Phi /
    sigma^2`` exactly, so kron and full Laplace have the same covariance (the closed form)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
        30, generator=g, dtype=torch.float64
    )
    lik = mz.likelihoods.Gaussian(noise=0.3)
    if kind == "builder":
        model = mz.models.mlp(3, hidden=[], likelihood=lik)
    else:
        model = mz.models.bayesian(nn.Sequential(nn.Linear(3, 1)), likelihood=lik)
    kw = dict(method="laplace", steps=0, refine_steps=0, progress=False)
    kron = mz.fit(model, x, y, structure="kron", **kw)
    full = mz.fit(model, x, y, structure="full", **kw)
    assert kron.info["structure"] == "kron"
    cov_k, cov_f = kron.approximation.covariance(), full.approximation.covariance()
    assert torch.allclose(cov_k, cov_f, rtol=1e-8, atol=1e-12)
    # the closed form: precision Phi^T Phi / sigma^2 + prior precision (Phi = [x, 1])
    phi = torch.cat([x, torch.ones(30, 1, dtype=torch.float64)], 1)
    prior = torch.linalg.inv(cov_f) - phi.T @ phi / 0.09
    assert torch.allclose(prior, torch.diag(prior.diagonal()), atol=1e-6)
    assert bool((prior.diagonal() > 0).all())


def test_conv_factors_match_a_brute_force_unfold(float64):
    """A and G of a conv layer and a dense layer against explicit patches and the output
    Jacobian ``J`` of each position: ``G = sum_{n,l} J_nl^T H_n J_nl``."""
    net = _conv_net().double()
    model = mz.models.bayesian(net, likelihood="categorical")
    x = torch.randn(6, 2, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    params = model.module_params(dtype=torch.float64)
    layers = kfac.find_layers(model, _offsets(params, model.bayesian_sites).get)
    assert [(k.name, k.kind, tuple(k.pos.shape)) for k in layers] == [
        ("0", "conv", (2 * 9 + 1, 3)),
        ("3", "linear", (60 + 1, 4)),
    ]
    got = kfac.kfac(model, params, layers, [(x, y)], _softmax_factor)
    # brute force
    w0, b0 = params["0.weight"], params["0.bias"]
    w3, b3 = params["3.weight"], params["3.bias"]

    def head(s):  # conv output (C, H, W) of one input -> logits
        return torch.tanh(s).reshape(-1) @ w3.T + b3

    a_conv, a_fc, g_conv, g_fc = 0, 0, 0, 0
    pat = _patches_by_hand(x, 3, 1)  # (N, 20, 18)
    for n in range(6):
        s = torch.nn.functional.conv2d(x[n : n + 1], w0, b0, padding=1)[0]
        f = head(s)
        p = torch.softmax(f, -1)
        h = torch.diag(p) - torch.outer(p, p)
        jac = torch.autograd.functional.jacobian(head, s).reshape(4, 3, 20)  # (O, C, L)
        for pos in range(20):
            a = torch.cat([pat[n, pos], torch.ones(1, dtype=torch.float64)])
            a_conv = a_conv + torch.outer(a, a)
            g_conv = g_conv + jac[:, :, pos].T @ h @ jac[:, :, pos]
        a = torch.cat([torch.tanh(s).reshape(-1), torch.ones(1, dtype=torch.float64)])
        a_fc = a_fc + torch.outer(a, a)
        g_fc = g_fc + h
    (a0, n0, g0), (a1, n1, g1) = got
    assert float(n0) == 6 * 20 and float(n1) == 6
    assert torch.allclose(a0, a_conv, rtol=1e-10, atol=1e-10)
    assert torch.allclose(g0, g_conv, rtol=1e-8, atol=1e-12)
    assert torch.allclose(a1, a_fc, rtol=1e-10, atol=1e-10)
    assert torch.allclose(g1, g_fc, rtol=1e-8, atol=1e-12)


def test_cnn_builder_records_its_forward(float64):
    """The CNN builder's layers run one by one give the builder's own output."""
    model = mz.models.cnn(1, 6, channels=[3, 2], hidden=[5], num_classes=3)
    params = {
        k: v.double() for k, v in model.sample_params(torch.zeros((), dtype=torch.float64)).items()
    }
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    names = [f"{spec.name}.{part}" for spec in model.layer_specs() for part in ("weight", "bias")]
    layers = kfac.find_layers(model, _offsets(params, names).get)
    assert [k.kind for k in layers] == ["conv", "conv", "linear", "linear"]
    from marginalize.core.layers import record as _record

    f, taps = _record(model, params, x, None, layers)
    assert torch.allclose(f, model.forward(params, x), atol=1e-12)
    assert all(len(calls) == 1 for calls in taps.calls.values())


def test_float32_factors_match_float64():
    """The factors accumulated in float32 against float64: relative error below 1e-4 (why
    laplace gathers K-FAC factors in the problem's float32 and eigendecomposes in float64)."""
    net = _conv_net()
    model = mz.models.bayesian(net, likelihood="categorical")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 5, 4, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    out = {}
    for dt in (torch.float32, torch.float64):
        params = model.module_params(dtype=dt)
        layers = kfac.find_layers(model, _offsets(params, model.bayesian_sites).get)
        chunks = [(x[i : i + 16].to(dt), y[i : i + 16]) for i in range(0, 64, 16)]
        out[dt] = kfac.kfac(model, params, layers, chunks, _softmax_factor)
    for f32, f64 in zip(out[torch.float32], out[torch.float64], strict=True):
        for a, b in zip(f32[::2], f64[::2], strict=True):
            err = float((a.double() - b).norm() / b.norm())
            assert err < 1e-4, err


@pytest.mark.parametrize("how", ["sites", "bayesian_sites"])
def test_last_layer_of_a_module_is_the_full_ggn_block(float64, how):
    """Last-layer Laplace of a module: the k x k precision is the block of the full GGN
    (autograd Jacobians of the whole network) plus the prior, to 1e-5; the factor is k x k."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(25, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (25,))
    if how == "sites":
        model = mz.models.bayesian(net, likelihood="categorical", sites=["2.weight", "2.bias"])
        post = mz.fit(model, x, y, method="laplace", steps=0, refine_steps=0, progress=False)
    else:
        model = mz.models.bayesian(net, likelihood="categorical")
        post = mz.fit(
            model,
            x,
            y,
            method="laplace",
            bayesian_sites="last_layer",
            steps=0,
            refine_steps=0,
            structure="full",
            progress=False,
        )
    layout = post.layout
    a = post.approximation
    idx = torch.cat(
        [
            torch.arange(layout[n].offset, layout[n].offset + layout[n].size)
            for n in ("2.weight", "2.bias")
        ]
    )
    if how == "bayesian_sites":
        assert a.cov_factor.shape == (21, 21) and torch.equal(a.idx, idx)
    cov = a.covariance()[idx[:, None], idx[None, :]]
    values = layout.unpack(a.loc)
    w, b = values["2.weight"], values["2.bias"]
    w0, b0 = net[0].weight, net[0].bias
    feats = torch.tanh(x @ w0.T + b0)

    def out(v):
        return feats @ v[:18].reshape(3, 6).T + v[18:]

    v0 = torch.cat([w.reshape(-1), b])
    jac = torch.autograd.functional.jacobian(out, v0)  # (N, 3, 21)
    p = torch.softmax(out(v0), -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("nok,nop,npl->kl", jac, h, jac)

    def log_prior(v):
        return model.log_prior(
            {
                "2.weight": v[:18].reshape(3, 6),
                "2.bias": v[18:],
                **{k: values[k] for k in model.bayesian_sites if not k.startswith("2.")},
            }
        )

    prior = -torch.autograd.functional.hessian(log_prior, v0)
    assert torch.allclose(torch.linalg.inv(cov), ggn + prior, rtol=1e-5, atol=1e-7)


def test_kron_conv_module_with_batchnorm_predicts(float64):
    """bayesian(module) with Conv2d, BatchNorm2d and Linear: kron fits (BatchNorm's affine
    parameters get a diagonal GGN block), and the GLM predictive is finite, sums to 1, fits
    the data and is less confident far away."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 120
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    x[:, :, :3] += (2 * y - 1).double()[:, None, None, None]  # class in the top half's sign
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 2),
    ).double()
    model = mz.models.bayesian(net, likelihood="categorical", prior=mz.priors.Normal(1.0))
    post = mz.fit(
        model,
        x,
        y,
        method="laplace",
        structure="kron",
        steps=150,
        lr=0.01,
        refine_steps=0,
        batch_size=40,
        progress=False,
    )
    assert post.info["structure"] == "kron"
    a = post.approximation
    bn = post.layout["1.weight"]
    var = a.variance()
    assert bool((var[bn.offset : bn.offset + bn.size] > 0).all())
    assert bool(torch.isfinite(var).all())
    p = post.predict(x).probs
    assert bool(torch.isfinite(p).all()) and torch.allclose(p.sum(-1), torch.ones(n, dtype=p.dtype))
    assert float((p.argmax(-1) == y).double().mean()) > 0.9
    far = 6 * torch.randn(20, 1, 6, 6, generator=g, dtype=torch.float64)
    conf_far = post.predict(far).probs.max(-1).values.mean()
    state = {k: v[0] for k, v in post.state.items()}  # the one chain's statistics
    f_map = model.forward(post.layout.unpack(a.loc), far, state)
    map_far = torch.softmax(f_map, -1).max(-1).values.mean()
    assert float(conf_far) < float(map_far)


def test_auto_picks_kron_for_conv_modules_past_the_dense_limit():
    net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 36, 3))
    model = mz.models.bayesian(net, likelihood="categorical")
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    post = mz.fit(model, x, y, method="laplace", steps=0, refine_steps=0, progress=False)
    assert post.info["structure"] == "kron"
    assert math.isfinite(post.info["log_evidence"])


def test_kron_refuses_a_plain_model_function():
    import pyro
    import pyro.distributions as dist

    def fn(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(x @ w, 1.0), obs=y)

    x, y = torch.randn(10, 2), torch.randn(10)
    with pytest.raises(mz.ModelError, match="K-FAC"):
        mz.fit(fn, x, y, method="laplace", structure="kron", steps=5, progress=False)


def test_last_layer_factor_saves_and_predicts_as_before(float64, tmp_path):
    """The k x k factor with its positions survives a save and load (io checks ``idx``), and
    the loaded posterior predicts the same probabilities."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 3, (30,))
    model = mz.models.bayesian(net, likelihood="categorical")
    post = mz.fit(
        model, x, y, method="laplace", bayesian_sites="last_layer", steps=20, progress=False
    )
    assert post.approximation.cov_factor.shape == (18, 18)
    post.save(tmp_path / "fit.pt")
    back = mz.load(tmp_path / "fit.pt", model=mz.models.bayesian(net, likelihood="categorical"))
    assert torch.equal(back.approximation.idx, post.approximation.idx)
    assert torch.allclose(back.predict(x).probs, post.predict(x).probs)
    draws = post.approximation.sample(4000, torch.Generator().manual_seed(0))[0]
    fixed = torch.ones(post.layout.size, dtype=torch.bool)
    fixed[post.approximation.idx] = False
    assert bool((draws[:, fixed] == post.approximation.loc[fixed]).all())


@pytest.mark.parametrize("tail", [False, True])
def test_module_last_layer_predictive_features_path(float64, tail):
    """The GLM predictive of a module's last layer runs on the layer's inputs (one pass per
    block) and gives the Jacobian path's moments; a layer that is not the output (a Tanh
    after it) is not taken for a linear head."""
    torch.manual_seed(0)
    layers = [nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)] + ([nn.Tanh()] if tail else [])
    net = nn.Sequential(*layers).double()
    x, y = torch.randn(40, 2, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = mz.models.bayesian(net, likelihood="categorical")
    post = mz.fit(
        model, x, y, method="laplace", bayesian_sites="last_layer", steps=30, progress=False
    )
    glm = post.predictive.linearized
    st = glm.state
    xt = torch.randn(7, 2, dtype=torch.float64)
    mu1, var1 = glm.block(xt).moments()
    if tail:
        assert st.grid is None
        return
    assert st.grid is not None and st.head == "2"
    st.grid = None  # the general path: Jacobians of the uncertain coordinates
    mu2, var2 = glm.block(xt).moments()
    assert torch.allclose(mu1, mu2, atol=1e-10) and torch.allclose(var1, var2, atol=1e-10)
    assert bool((var1 > 0).all())


def test_batchnorm_affine_diagonal_is_the_exact_ggn_diagonal(float64):
    """A BatchNorm layer in eval mode is ``w xhat + b`` per channel: the recorded GGN
    diagonal of its weight and bias equals ``diag(J^T H J)`` from autograd Jacobians."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2)
    ).double()
    bn = net[1]
    bn.running_mean.copy_(torch.randn(3))
    bn.running_var.copy_(torch.rand(3) + 0.5)
    bn.weight.data.copy_(torch.randn(3))
    bn.bias.data.copy_(torch.randn(3))
    model = mz.models.bayesian(net, likelihood="categorical")
    params = model.module_params(dtype=torch.float64)
    offsets = _offsets(params, model.bayesian_sites)
    norms = kfac.find_norms(model, offsets.get)
    assert [(k.name, tuple(k.pos.shape)) for k in norms] == [("1", (2, 3))]
    x, y = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    ((diag, _, _),) = kfac.kfac(model, params, norms, [(x, y)], _softmax_factor)

    def out(v):
        p = {**params, "1.weight": v[:3], "1.bias": v[3:]}
        return model.forward(p, x)

    v0 = torch.cat([params["1.weight"], params["1.bias"]])
    jac = torch.autograd.functional.jacobian(out, v0)  # (N, 2, 6)
    p = torch.softmax(out(v0), -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    want = torch.einsum("nok,nop,npk->k", jac, h, jac)
    assert torch.allclose(diag.reshape(-1), want, rtol=1e-8, atol=1e-12)


def test_factors_match_laplace_torch(float64):
    """Cross-check (skipped without laplace-torch): its K-FAC of a conv net (curvlinops
    backend, 'expand' convolutions, bias as its own block) has the same weight blocks
    ``G (x) A_w`` and bias blocks ``G`` as ours, to rounding."""
    laplace = pytest.importorskip("laplace")
    net = _conv_net().double()
    x = torch.randn(12, 2, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    data = torch.utils.data.TensorDataset(x, y)
    la = laplace.Laplace(net, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit(torch.utils.data.DataLoader(data, batch_size=12))
    theirs = la.H_facs.kfacs
    model = mz.models.bayesian(net, likelihood="categorical")
    params = model.module_params(dtype=torch.float64)
    layers = kfac.find_layers(model, _offsets(params, model.bayesian_sites).get)
    got = kfac.kfac(model, params, layers, [(x, y)], _softmax_factor)
    for i, (a_sum, count, g) in enumerate(got):
        a = a_sum / count
        weight, bias = theirs[2 * i], theirs[2 * i + 1]
        want = torch.kron(weight[0], weight[1])
        assert torch.allclose(torch.kron(g, a[:-1, :-1]), want, rtol=1e-10, atol=1e-12)
        assert torch.allclose(g * a[-1, -1], bias[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["conv-bn-kron", "mlp-full", "cnn-diag"])
def test_glm_jacobian_from_a_recorded_pass_matches_per_example_jacobians(float64, case):
    """Where the uncertain coordinates are whole dense, conv or BatchNorm layers, the GLM
    predictive's Jacobian comes from one recorded pass: same moments as per-example ones."""
    torch.manual_seed(0)
    if case == "conv-bn-kron":
        net = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48, 3),
        ).double()
        model, structure = mz.models.bayesian(net, likelihood="categorical"), "kron"
        x = torch.randn(30, 1, 4, 4, dtype=torch.float64)
    elif case == "mlp-full":
        model, structure = mz.models.mlp(2, [5], 3, likelihood="categorical"), "full"
        x = torch.randn(30, 2, dtype=torch.float64)
    else:
        model = mz.models.cnn(1, 4, channels=[2], hidden=[3], num_classes=3)
        structure, x = "diag", torch.randn(30, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    post = mz.fit(
        model, x, y, method="laplace", structure=structure, steps=20, batch_size=10, progress=False
    )
    glm = post.predictive.linearized
    st = glm.state
    assert st.layers is not None
    xt = x[:7] + 0.1
    mu1, cov1 = glm.block(xt).moments(full_cov=True)
    st.layers = None
    mu2, cov2 = glm.block(xt).moments(full_cov=True)
    assert torch.allclose(mu1, mu2, atol=1e-12)
    assert torch.allclose(cov1, cov2, rtol=1e-9, atol=1e-12)


def test_exact_ggn_of_whole_layers_matches_autograd(float64):
    """The GGN of every layer of a Conv2d + BatchNorm + Linear module from one recorded pass
    equals ``sum_n J_n^T H_n J_n`` from autograd Jacobians; its diagonal (structure='diag')
    is that matrix's diagonal."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)
    ).double()
    net[1].running_mean.copy_(torch.randn(2))
    net[1].running_var.copy_(torch.rand(2) + 0.5)
    model = mz.models.bayesian(net, likelihood="categorical")
    params = model.module_params(dtype=torch.float64)
    names = model.bayesian_sites
    offsets = _offsets(params, names)
    layers = kfac.find_layers(model, offsets.get) + kfac.find_norms(model, offsets.get)
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    chunks = [(x[:4], y[:4]), (x[4:], y[4:])]
    full, order = kfac.exact_ggn(model, params, layers, chunks, _softmax_factor)
    diag, order2 = kfac.exact_ggn(model, params, layers, chunks, _softmax_factor, diag=True)
    assert torch.equal(order, order2) and sorted(order.tolist()) == list(range(order.numel()))

    def out(v):
        p = {
            n: v[offsets[n] : offsets[n] + params[n].numel()].reshape(params[n].shape)
            for n in names
        }
        return model.forward(p, x)

    v0 = torch.cat([params[n].reshape(-1) for n in names])
    jac = torch.autograd.functional.jacobian(out, v0)  # (N, 3, D)
    p = torch.softmax(out(v0), -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    want = torch.einsum("nok,nop,npl->kl", jac, h, jac)[order[:, None], order[None, :]]
    assert torch.allclose(full, want, rtol=1e-8, atol=1e-12)
    assert torch.allclose(diag, want.diagonal(), rtol=1e-8, atol=1e-12)


def test_diag_laplace_of_a_conv_module_uses_the_recorded_layers(float64, monkeypatch):
    """structure='diag' over whole layers (conv, BatchNorm, linear): no per-example Jacobians,
    and the same variances as that path gives (forced by hiding the layers)."""
    from marginalize.inference.methods import laplace as lp

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)
    ).double()
    model = mz.models.bayesian(net, likelihood="categorical")
    x, y = torch.randn(20, 1, 4, 4, dtype=torch.float64), torch.randint(0, 2, (20,))
    kw = dict(method="laplace", structure="diag", steps=0, refine_steps=0, progress=False)
    calls = []
    per_example = lp._ggn  # noqa: SLF001

    def spy(*args, **kwargs):
        calls.append(1)
        return per_example(*args, **kwargs)

    monkeypatch.setattr(lp, "_ggn", spy)
    fast = mz.fit(model, x, y, **kw)
    assert not calls  # the recorded layers, not per-example Jacobians
    monkeypatch.setattr(lp, "_layers", lambda *a: [])
    slow = mz.fit(model, x, y, **kw)
    assert calls
    assert torch.allclose(fast.approximation.scale, slow.approximation.scale, rtol=1e-8)
