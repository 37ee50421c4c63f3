"""The posterior predictive, a public layer: :class:`Predictive` and what it computes with.

Modules, from the bottom up:

* ``summaries``: class probabilities, entropies, per-draw moments with substitutes for heavy
  tails, running moments over chunks (:class:`Moments`), tempering;
* ``mixture``: the predictive of real targets as a mixture over draws (quantiles, CDF,
  density);
* ``memory``: activation memory per input (measured by a probe forward) and the chunk plan;
* ``plain``: a plain model function's outputs, vectorized over draws;
* ``glm``: the linearized (GLM) predictive of a Gaussian posterior (Laplace);
* ``network``: the one place where the predictive calls the network;
* ``prediction``: :class:`Prediction`, the result of ``predict``;
* ``predictive``: :class:`Predictive`, every pass of a fitted posterior over inputs.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.randn(30, 1); y = x[:, 0] + 0.1 * torch.randn(30)
>>> post = mz.fit(mz.models.mlp(1, hidden=[4]), x, y, method="svi-meanfield", steps=50,
...               progress=False)
>>> isinstance(post.predictive, Predictive)
True
>>> post.predictive.log_predictive(x, y, num_samples=10).shape
torch.Size([30])
"""

from marginalize.core.predictive.memory import ActivationMeter, ChunkPlan, plan_chunks
from marginalize.core.predictive.mixture import (
    BISECTION_STEPS,
    MC_DRAWS,
    JoinedMixture,
    PredictiveMixture,
)
from marginalize.core.predictive.network import ChunkDist, DrawChunk, DrawSummaries
from marginalize.core.predictive.plain import PlainDraws
from marginalize.core.predictive.prediction import Prediction
from marginalize.core.predictive.predictive import BN_UPDATE, DEFAULT_DRAWS, Draws, Predictive
from marginalize.core.predictive.summaries import (
    Moments,
    MomentWarning,
    class_probs,
    entropy,
    heavy_tailed,
    log_prob,
    moment_notes,
    regression_moments,
    temper,
)

__all__ = [
    "Predictive",
    "Prediction",
    "Draws",
    "DrawChunk",
    "ChunkDist",
    "DrawSummaries",
    "ActivationMeter",
    "ChunkPlan",
    "plan_chunks",
    "Moments",
    "MomentWarning",
    "PlainDraws",
    "PredictiveMixture",
    "JoinedMixture",
    "class_probs",
    "entropy",
    "heavy_tailed",
    "log_prob",
    "moment_notes",
    "regression_moments",
    "temper",
    "BN_UPDATE",
    "DEFAULT_DRAWS",
    "MC_DRAWS",
    "BISECTION_STEPS",
]
