"""Deep-learning workflows: data loaders, trained networks as starts, BatchNorm as state.

A small ResNet-style network with BatchNorm on tiny 3x8x8 images (seconds per test): fits from
a ``DataLoader`` equal fits from arrays on the same minibatches, a 0-step fit is the module,
post-hoc Laplace / SWAG / ensembles run at the weights a user trained, BatchNorm trains in
train mode and its statistics travel with the posterior, the methods that need every row refuse
a loader before fitting, and no call of the network sees every row.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import marginalize as mz
from conftest import tiny_options
from marginalize.core.data import LoaderData
from marginalize.core.problem import CHECK_ROWS, prepare
from marginalize.inference.engines.training import MAPOptions, batch_order, fit_point
from test_contract import _press_ctrl_c_at

N, B = 96, 16


class Block(nn.Module):
    """A residual block: conv-BN-ReLU-conv-BN plus the input."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, width=4, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block = Block(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        h = self.block(F.relu(self.bn(self.stem(x))))
        return self.fc(h.mean((2, 3)))


def images(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    x[:, 0] += 0.8 * torch.randn(n, 1, 1, generator=g)  # class structure in channel means
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0.3).long()
    return x, y


def trained_net(seed=0, steps=60):
    """A TinyResNet trained by hand (Adam, train-mode BatchNorm), returned in eval mode."""
    torch.manual_seed(seed)
    net = TinyResNet()
    x, y = images(seed=seed)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    net.train()
    for i in range(steps):
        idx = torch.arange(i * B, (i + 1) * B) % N
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net.eval()


def bnn(net, **kw):
    return mz.models.bayesian(net, prior=mz.priors.Normal(1.0), likelihood="categorical", **kw)


def site_values(post):
    return post.layout.unpack(post.approximation.loc)


# ---- data loaders ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["resnet", "mlp"])
def test_loader_fit_equals_arrays_fit_for_the_same_minibatches(kind):
    """A DataLoader (no shuffle) over the rows in the order the arrays path takes them gives the
    same fit: parameters and BatchNorm statistics (the closed-form MLP path and the module
    path alike)."""
    if kind == "resnet":
        torch.manual_seed(1)
        model, (x, y) = bnn(TinyResNet()), images()
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, 3, generator=g)
        y = x[:, 0] - x[:, 1] + 0.1 * torch.randn(N, generator=g)
        model = mz.models.mlp(3, hidden=[8])
    seed, epochs = 4, 3
    steps = epochs * (N // B)
    kw = dict(method="map", optimizer="adam", lr=0.01, steps=steps, seed=seed, progress=False)
    ref = mz.fit(model, x, y, batch_size=B, **kw)
    # the arrays path's minibatches: an epoch-wise permutation drawn from the fit's seed
    order = torch.cat(
        [b.idx for b in batch_order(N, B, steps, torch.Generator().manual_seed(seed), "cpu")]
    )
    loader = DataLoader(TensorDataset(x[order], y[order]), batch_size=B, shuffle=False)
    got = mz.fit(model, loader, n=N, **kw)  # one pass of the loader holds all epochs
    assert isinstance(got.data, LoaderData) and isinstance(ref.data, tuple)  # the loader itself
    assert torch.allclose(got.approximation.loc, ref.approximation.loc, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.info.loss, ref.info.loss, rtol=1e-5)
    if kind == "resnet":  # BatchNorm statistics at the fitted weights, over the loader's batches
        want = model.state_from_data(site_values(got), [xb for xb, _ in loader])
        for k, v in want.items():
            assert torch.allclose(got.state[k][0].double(), v.double(), atol=1e-6), k


def test_loader_transforms_run_per_step_and_epochs_count_passes():
    """Each step reads the loader's next minibatch, through its transform; epochs=E is E passes
    (steps = E x len(loader)); steps and epochs together are refused."""
    x, y = images()
    seen = []

    class Flipping(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            img = x[i].flip(-1) if torch.rand(()) < 0.5 else x[i]  # a random flip per read
            seen.append(i)
            return img, y[i]

    loader = DataLoader(Flipping(), batch_size=B, shuffle=True)
    model = bnn(TinyResNet())
    post = mz.fit(model, loader, method="map", epochs=2, progress=False)
    assert post.info.steps_done == 2 * len(loader)
    # the checks read two minibatches, training two passes, the BatchNorm statistics one pass
    assert len(seen) == 2 * B + 3 * N
    with pytest.raises(mz.OptionError, match="give steps or epochs"):
        mz.fit(model, loader, method="map", epochs=2, steps=5, progress=False)


def test_full_batch_methods_refuse_a_loader_before_fitting(monkeypatch):
    x, y = images()
    loader = DataLoader(TensorDataset(x, y), batch_size=B)
    model = bnn(TinyResNet())
    from marginalize.inference.engines import training

    def no_training(*a, **k):  # pragma: no cover - reached only if a check is missing
        raise AssertionError("fitting started")

    monkeypatch.setattr(training, "train", no_training)
    for method in ("nuts", "hmc"):
        with pytest.raises(
            mz.DataError, match=f"{method}: .*every row.*cannot read a data loader.*svi"
        ):
            mz.fit(model, loader, method=method, progress=False)
    with pytest.raises(mz.OptionError, match="lbfgs.*needs the data in memory"):
        mz.fit(model, loader, method="map", optimizer="lbfgs", progress=False)
    with pytest.raises(mz.OptionError, match="batch_size: with a data loader"):
        mz.fit(model, loader, method="map", batch_size=8, progress=False)
    with pytest.raises(mz.DataError, match="refine_steps.*needs the data in memory"):
        mz.fit(model, loader, method="laplace", refine_steps=10, progress=False)
    with pytest.raises(mz.DataError, match="y: a data loader yields"):
        mz.fit(model, loader, y, method="map", progress=False)
    with pytest.raises(mz.DataError, match="y: missing"):
        mz.fit(model, x, method="map", progress=False)
    with pytest.raises(mz.DataError, match="torch Dataset.*DataLoader"):
        mz.fit(model, TensorDataset(x, y), method="map", progress=False)


FULL_BATCH = ("nuts", "hmc")


@pytest.mark.parametrize("method", [m for m in mz.methods() if m not in FULL_BATCH])
def test_every_minibatch_method_fits_a_batchnorm_net_from_a_loader(method):
    """Every method that trains on minibatches reads a data loader and trains BatchNorm in
    train mode: the fitted posterior carries running statistics recomputed at its weights
    (not the module's initial ones), and predicts from a loader of inputs."""
    x, y = images()
    loader = DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True)
    net = TinyResNet()
    opts = tiny_options(method)
    post = mz.fit(bnn(net), loader, method=method, seed=0, progress=False, **opts)
    assert isinstance(post.data, LoaderData)
    assert post.state is not None
    tracked = post.state["bn.num_batches_tracked"]
    assert tracked.shape[0] == post.num_chains and bool((tracked > 0).all()), method
    assert not torch.equal(post.state["bn.running_var"][0], net.bn.running_var), method
    pred = post.predict(DataLoader(TensorDataset(x[:20]), batch_size=7), num_samples=4, seed=0)
    assert pred.probs.shape == (20, 3) and torch.isfinite(pred.probs).all()


def test_problem_x_of_a_loader_names_the_method_and_the_alternative():
    x, y = images()
    pb = prepare(bnn(TinyResNet()), DataLoader(TensorDataset(x, y), batch_size=B))
    pb.meta["method"] = "somemethod"
    with pytest.raises(
        mz.DataError, match="somemethod: .*whole training data.*data loader.*arrays"
    ):
        pb.x  # noqa: B018


def test_no_call_of_the_network_sees_every_row():
    """Checking the data, training on minibatches and swag_lr='auto' call the network on
    bounded chunks (``../shared/cases/scale_full_data_in_one_forward.py``)."""
    n = 4 * CHECK_ROWS
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 2, (n,), generator=g)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2))
    model = mz.models.bayesian(net, prior=mz.priors.Normal(1.0), likelihood="categorical")
    seen = []
    model.module[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-2]))
    mz.fit(model, x, y, method="map", batch_size=32, steps=3, progress=False)
    mz.fit(
        model,
        x,
        y,
        method="swag",
        batch_size=32,
        pretrain_steps=3,
        swag_steps=8,
        collect_every=2,
        max_rank=2,
        progress=False,
    )
    assert seen and max(seen) <= CHECK_ROWS


def test_out_of_memory_names_the_step():
    class Greedy(nn.Module):
        """Runs out of memory on more than ``rows`` rows (with gradients: on ``grad_rows``)."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.rows, self.grad_rows = 10**9, 10**9

        def forward(self, x):
            limit = self.grad_rows if torch.is_grad_enabled() else self.rows
            if x.shape[0] > limit:
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return self.fc(x)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 2, generator=g), torch.randint(0, 2, (40,), generator=g)
    model = mz.models.bayesian(Greedy(), likelihood="categorical")
    model.module.rows = model.module.grad_rows = 20  # the check of all 40 rows
    with pytest.raises(mz.OutOfMemoryError, match="checking the data against the model"):
        mz.fit(model, x, y, method="map", progress=False)
    model.module.rows, model.module.grad_rows = 10**9, 6  # a training step
    with pytest.raises(
        mz.OutOfMemoryError, match="map: out of memory at step 0 on minibatches of 8"
    ):
        mz.fit(model, DataLoader(TensorDataset(x, y), batch_size=8), method="map", progress=False)


# ---- trained networks as starts -------------------------------------------------------------
def test_zero_step_start_is_the_module():
    """``bayesian(net)`` starts from the net (init='auto' -> 'module'): a 0-step MAP is the
    network, weights, BatchNorm statistics and predictions; a 1-step MAP at lr=1e-12 too
    (``../shared/cases/scale_fit_ignores_module_weights.py``)."""
    net = trained_net()
    x, y = images(seed=1)
    model = bnn(net)
    post = mz.fit(model, x, y, method="map", steps=0, progress=False)
    own = dict(net.named_parameters())
    for k, v in site_values(post).items():
        assert torch.equal(v, own[k].detach()), k
    buffers = dict(net.named_buffers())
    for k, v in post.state.items():
        assert v.shape[0] == 1 and torch.equal(v[0], buffers[k]), k
    with torch.no_grad():
        want = torch.softmax(net(x), -1)
    assert torch.allclose(post.predict(x).probs, want, atol=1e-5)
    one = mz.fit(
        model,
        x,
        y,
        method="map",
        optimizer="adam",
        lr=1e-12,
        steps=1,
        batch_size=32,
        progress=False,
    )
    assert max(float((v - own[k]).abs().max()) for k, v in site_values(one).items()) < 1e-6
    # one step trained BatchNorm, whose statistics are then recomputed at the (same) weights
    acc = float((one.predict(x).probs.argmax(-1) == y).float().mean())
    assert acc >= float((want.argmax(-1) == y).float().mean()) - 2 / len(y)
    assert net.training is False and torch.equal(buffers["bn.running_mean"], net.bn.running_mean)


def test_init_reset_is_a_fresh_pytorch_initialization():
    net = trained_net()
    x, y = images()
    post = mz.fit(bnn(net), x, y, method="map", steps=0, init="reset", seed=3, progress=False)
    v = site_values(post)
    assert torch.equal(v["bn.weight"], torch.ones(4)) and torch.equal(v["bn.bias"], torch.zeros(4))
    assert not torch.equal(v["stem.weight"], net.stem.weight.detach())
    assert torch.equal(post.state["bn.running_var"][0], torch.ones(4))
    with pytest.raises(mz.OptionError, match="init='module'.*mz.models.bayesian"):
        mz.fit(
            mz.models.mlp(2, hidden=[3]),
            torch.randn(8, 2),
            torch.randn(8),
            method="map",
            init="module",
            progress=False,
        )


def _last_layer_precision(net, x, y, prior_precision=1.0):
    """The GGN of the last layer of ``net`` (eval-mode features) plus the prior precision,
    by hand: ``sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n + I``, coordinates (fc.weight row-major,
    fc.bias)."""
    with torch.no_grad():
        h = net.block(F.relu(net.bn(net.stem(x)))).mean((2, 3)).double()
        p = torch.softmax(net.fc(h.float()).double(), -1)
    k, d = p.shape[1], h.shape[1]
    phi = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)  # weight columns, then bias
    prec = torch.zeros(k * d + k, k * d + k, dtype=torch.float64)
    for n in range(len(x)):
        lam = torch.diag(p[n]) - torch.outer(p[n], p[n])
        j = torch.zeros(k, k * d + k, dtype=torch.float64)
        for o in range(k):
            j[o, o * d : (o + 1) * d] = phi[n, :d]
            j[o, k * d + o] = 1.0
        prec += j.T @ lam @ j
    return prec + prior_precision * torch.eye(k * d + k, dtype=torch.float64)


def test_laplace_on_a_trained_network_at_its_weights():
    """Post-hoc last-layer Laplace at the trained weights (steps=0: no MAP stage, no
    refinement): the mean is the net's, the precision the GGN of the last layer with BatchNorm
    in eval mode at the net's statistics (checked by hand), the statistics travel with it."""
    net = trained_net()
    x, y = images()
    post = mz.fit(
        bnn(net),
        x,
        y,
        method="laplace",
        subset="last_layer",
        steps=0,
        structure="full",
        hessian="ggn",
        progress=False,
    )
    own = dict(net.named_parameters())
    for k, v in site_values(post).items():
        assert torch.equal(v, own[k].detach()), k
    assert post.info.details["refine"]["skipped"].startswith("no MAP stage")
    cov = post.approximation.covariance().double()
    names = post.layout.names
    idx = torch.cat(
        [
            torch.arange(post.layout[n].offset, post.layout[n].offset + post.layout[n].size)
            for n in ("fc.weight", "fc.bias")
        ]
    )
    assert names[-2:] == ["fc.weight", "fc.bias"]
    want = torch.linalg.inv(_last_layer_precision(net, x, y))
    assert torch.allclose(cov[idx][:, idx], want, rtol=1e-4, atol=1e-7)
    assert torch.equal(post.state["bn.running_mean"][0], net.bn.running_mean)
    acc_net = float((net(x).argmax(-1) == y).float().mean())
    acc = float((post.predict(x).probs.argmax(-1) == y).float().mean())
    assert acc >= acc_net - 0.05
    # all weights, diagonal: also at the trained weights, with a loader
    loader = DataLoader(TensorDataset(x, y), batch_size=B)
    diag = mz.fit(bnn(net), loader, method="laplace", steps=0, structure="diag", progress=False)
    for k, v in site_values(diag).items():
        assert torch.equal(v, own[k].detach()), k
    assert bool((diag.approximation.scale > 0).all())


def test_swag_from_trained_weights():
    """swag with init='module' and pretrain_steps=0: the SWA phase starts at the trained weights
    (no pretraining); the SWA mean stays in their basin, and the fit predicts as well."""
    net = trained_net()
    x, y = images()
    xt, yt = images(seed=5)
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    kw = dict(method="swag", pretrain_steps=0, batch_size=B, progress=False)
    still = mz.fit(bnn(net), x, y, swag_steps=12, collect_every=3, max_rank=2, swag_lr=1e-9, **kw)
    assert torch.allclose(still.approximation.loc, start, atol=1e-6)  # the phase starts there
    post = mz.fit(bnn(net), x, y, swag_steps=60, collect_every=6, max_rank=4, **kw)
    assert post.info.details["pretrain_steps"] == 0
    mean = site_values(post)
    acc_net = float((net(xt).argmax(-1) == yt).float().mean())
    acc = float((post.predict(xt, num_samples=20, seed=0).probs.argmax(-1) == yt).float().mean())
    assert acc >= acc_net - 0.1
    # the SWA mean's BatchNorm statistics are recomputed at the SWA mean (bn_update)
    model = post.model
    want = model.state_from_data(mean, [x[i : i + 512] for i in range(0, N, 512)])
    assert torch.allclose(post.state["bn.running_mean"][0], want["bn.running_mean"], atol=1e-5)


def test_ensemble_from_given_networks():
    """ensemble(members=[nets]) with steps=0 is exactly those networks: one chain each, with
    its own BatchNorm statistics; the predictive is the mean of their softmax outputs."""
    nets = [trained_net(seed=s, steps=20) for s in range(3)]
    # the members share no fixed parameters here: every parameter is a Bayesian site
    x, y = images()
    post = mz.fit(bnn(nets[0]), x, y, method="ensemble", members=nets, steps=0, progress=False)
    assert post.num_chains == 3
    for c, net in enumerate(nets):
        loc = post.approximation.components[c].loc
        own = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        assert torch.equal(loc, own)
        assert torch.equal(post.state["bn.running_var"][c], net.bn.running_var)
    with torch.no_grad():
        want = torch.stack([torch.softmax(n(x), -1) for n in nets]).mean(0)
    assert torch.allclose(post.predict(x, num_samples=3).probs, want, atol=1e-5)
    with pytest.raises(mz.OptionError, match="num_members: 2 given with 3 members"):
        mz.fit(bnn(nets[0]), x, y, method="ensemble", members=nets, num_members=2, progress=False)
    # state dicts work too, and members then train from their weights
    trained = mz.fit(
        bnn(nets[0]),
        x,
        y,
        method="ensemble",
        steps=3,
        batch_size=B,
        members=[n.state_dict() for n in nets[:2]],
        progress=False,
    )
    assert trained.num_chains == 2


def test_last_layer_variant_holds_the_body_at_the_trained_values():
    """bayesian(net, sites=["fc"]): the body is part of the fixed network, at the trained
    weights and BatchNorm statistics (eval mode: no state to fit); an SVI of the last layer
    from a loader leaves it exactly there."""
    net = trained_net()
    x, y = images()
    model = bnn(net, sites=["fc"])
    assert not model.stateful
    loader = DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True)
    post = mz.fit(model, loader, method="svi-meanfield", steps=12, progress=False)
    assert post.state is None and post.layout.names == ["fc.weight", "fc.bias"]
    with torch.no_grad():
        feats = net.block(F.relu(net.bn(net.stem(x)))).mean((2, 3))
        loc = site_values(post)
        want = torch.softmax(feats @ loc["fc.weight"].T + loc["fc.bias"], -1)
    got = post.model.forward(loc, x).softmax(-1)
    assert torch.allclose(got, want, atol=1e-5)


def test_ensemble_members_must_share_the_fixed_network():
    a, b = trained_net(seed=0, steps=5), trained_net(seed=1, steps=5)
    x, y = images()
    with pytest.raises(mz.OptionError, match="fixed .*'stem.weight' differs"):
        mz.fit(
            bnn(a, sites=["fc"]), x, y, method="ensemble", members=[a, b], steps=0, progress=False
        )


# ---- BatchNorm ------------------------------------------------------------------------------
def test_batchnorm_trains_in_train_mode_with_the_modules_momentum():
    """The training loop runs BatchNorm on batch statistics and updates the running statistics
    with the layer's momentum after every kept step, exactly as a torch loop over the same
    minibatches does; the final posterior then carries the statistics at the final weights."""
    torch.manual_seed(0)
    net = TinyResNet()
    net.bn.momentum = 0.3
    x, y = images()
    problem = prepare(bnn(net), x, y)
    steps, seed = 5, 2
    fit_point(
        problem, MAPOptions(steps=steps, batch_size=B, optimizer="adam", lr=1e-9), seed, False
    )
    ref = copy.deepcopy(net).train()
    with torch.no_grad():
        for b in batch_order(N, B, steps, torch.Generator().manual_seed(seed), "cpu"):
            ref(x[b.idx])  # lr=1e-9: the weights do not move
    for k, v in problem.state.items():
        assert torch.allclose(v, dict(ref.named_buffers())[k], rtol=1e-5, atol=1e-7), k
    assert int(problem.state["bn.num_batches_tracked"]) == steps
    post = mz.fit(bnn(net), x, y, method="map", steps=20, batch_size=B, progress=False)
    assert not torch.allclose(post.state["bn.running_mean"][0], net.bn.running_mean)
    want = post.model.state_from_data(
        site_values(post), [x[i : i + 1024] for i in range(0, N, 1024)]
    )
    for k, v in want.items():
        assert torch.allclose(post.state[k][0].double(), v.double(), atol=1e-6), k
    assert torch.equal(net.bn.running_mean, torch.zeros(4))  # the user's module is untouched


def test_state_from_data_matches_torch_batchnorm_with_cumulative_average():
    """``state_from_data`` for a block of different weight draws equals torch's BatchNorm with
    momentum=None (cumulative average) run over the same chunks for each draw."""
    torch.manual_seed(0)
    net = TinyResNet()
    model = bnn(net)
    x, _ = images()
    chunks = [x[i : i + 24] for i in range(0, N, 24)]
    base = model.module_params()
    draws = {k: v + 0.3 * torch.randn(3, *v.shape) for k, v in base.items()}
    got = model.state_from_data(draws, chunks)
    for s in range(3):
        ref = copy.deepcopy(net)
        with torch.no_grad():
            for k, p in ref.named_parameters():
                p.copy_(draws[k][s])
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        ref.train()
        with torch.no_grad():
            for c in chunks:
                ref(c)
        for k, v in ref.named_buffers():
            tol = dict(rtol=1e-4, atol=1e-6)
            assert torch.allclose(got[k][s].double(), v.double(), **tol), (k, s)


def test_batchnorm_nets_with_mc_dropout_and_svi_draws():
    """MC dropout's masks and SVI's weight draws (several per step: one copy of the running
    statistics per draw) train a BatchNorm net; predictions are finite and use the fitted
    statistics."""
    torch.manual_seed(0)
    x, y = images()
    model = bnn(TinyResNet())
    for method, kw in (("mc-dropout", {"p": 0.2}), ("svi-meanfield", {"num_particles": 3})):
        post = mz.fit(model, x, y, method=method, steps=10, batch_size=B, progress=False, **kw)
        assert post.state is not None and post.state["bn.running_mean"].shape == (1, 4)
        assert torch.isfinite(post.predict(x, num_samples=4, seed=0).probs).all()


def test_posterior_state_is_saved_and_loaded(tmp_path):
    net = trained_net()
    x, y = images()
    loader = DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True)
    post = mz.fit(bnn(net), loader, method="map", steps=6, progress=False)
    post.save(tmp_path / "fit.pt")
    back = mz.load(tmp_path / "fit.pt", model=bnn(net))
    for k, v in post.state.items():
        assert torch.equal(back.state[k], v)
    assert back.data is None
    assert torch.equal(back.predict(x).probs, post.predict(x).probs)


def test_resume_with_a_shuffling_augmenting_loader_is_the_uninterrupted_fit(tmp_path, monkeypatch):
    """The checkpoint records the RNG states at the start of each pass of the loader: a resumed
    fit starts the pass again, skips what was taken and reads the same minibatches (shuffle and
    random flips drawn from torch's RNG), so it equals the fit that was never interrupted."""
    x, y = images()

    class Flipping(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return (x[i].flip(-1) if torch.rand(()) < 0.5 else x[i]), y[i]

    loader = DataLoader(Flipping(), batch_size=B, shuffle=True)
    model = bnn(TinyResNet())
    kw = dict(method="map", steps=14, seed=3, progress=False)
    ref = mz.fit(model, loader, **kw)
    _press_ctrl_c_at(monkeypatch, 9)
    path = tmp_path / "fit.ckpt"
    part = mz.fit(model, loader, checkpoint=path, checkpoint_every=4, **kw)
    monkeypatch.undo()
    assert part.info.interrupted
    res = mz.resume(path, model, loader, progress=False)
    assert torch.equal(res.approximation.loc, ref.approximation.loc)
    for k, v in ref.state.items():
        assert torch.equal(res.state[k], v), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["map", "swag", "laplace", "ensemble"])
def test_loader_fits_of_a_batchnorm_net_on_cuda(method):
    """A CPU DataLoader feeding a fit on the GPU (device="cuda"): minibatches, BatchNorm
    statistics and the posterior live on the GPU."""
    x, y = images()
    loader = DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True)
    kw = {"swag": dict(pretrain_steps=6, swag_steps=12, collect_every=3, max_rank=2)}.get(
        method, dict(steps=6)
    )
    post = mz.fit(bnn(trained_net()), loader, method=method, device="cuda", progress=False, **kw)
    assert post.device.type == "cuda"
    assert all(v.device.type == "cuda" for v in post.state.values())
    probs = post.predict(x.cuda(), num_samples=4, seed=0).probs
    assert probs.device.type == "cuda" and torch.isfinite(probs).all()


def test_defaults_switch_to_minibatches_when_the_full_batch_outgrows_memory(monkeypatch):
    """Issue 25.2: ``batch_size=None`` (the full batch, the default of most methods) becomes
    minibatches of 128 when one full-batch gradient would need more than FULL_BATCH_BYTES of
    activations (measured per input); small problems, a given batch_size or L-BFGS keep
    theirs. ResNet-20 at N = 10,000: about 27 GB, so minibatches."""
    from marginalize.inference import registry

    x, y = images(n=200)
    model = bnn(TinyResNet())
    per = model.activation_bytes_per_input(x[:1])
    post = mz.fit(model, x, y, method="map", steps=2, progress=False)
    assert "batch_size" not in post.info.details  # 200 rows fit: the full batch, as before
    monkeypatch.setattr(registry, "FULL_BATCH_BYTES", per * 100)  # room for 100 rows
    post = mz.fit(model, x, y, method="map", steps=2, progress=False)
    assert post.info["batch_size"].startswith("auto: 128")
    assert post.options["batch_size"] == 128 and post.options["optimizer"] == "auto"
    for given in ({"batch_size": None}, {"batch_size": 32}, {"optimizer": "lbfgs"}):
        post = mz.fit(model, x, y, method="map", steps=2, progress=False, **given)
        assert "batch_size" not in post.info.details, given
