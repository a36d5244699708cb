"""OULAD's clicks under DP-SGD: an ordinary week must be an input the clipped gradient sees.

Guards the finding behind OULAD contract 1.3.0 (issue 19; docs/results.md, "Clicks on a log
scale"). On the linear scale of contracts 1.1.0-1.2.0 (clicks / 100) a week of 10 clicks was an
input of 0.1, and the LSTM's input weights reading the 20 click types held about 1 % of each
student's squared gradient at initialisation: after clipping and noise, the federated DP model's
at-risk probabilities differed between students by about 0.001, the noise reordered them from
round to round, and one run in four or five ended at chance or inverted (at-risk ROC-AUC 0.12-0.56
on OULAD AAA at epsilon 1-3). Read as log(1 + clicks), the same week is 0.9 and those weights
hold about a quarter of the gradient.
"""

from __future__ import annotations

import numpy as np
import torch

from shared_models.data.contract import FeatureSpec
from shared_models.evaluation import input_tensors
from shared_models.losses import task_loss
from shared_models.models.registry import build_model
from tests.privacy.test_dp_static_attributes import WEEKS, _oulad_inputs, _spec


def _linear(spec: FeatureSpec) -> FeatureSpec:
    """The same contract with the clicks on 1.2.0's linear scale."""
    dynamic = [f.model_copy(update={"transform": None}) for f in spec.dynamic]
    return spec.model_copy(update={"dynamic": dynamic})


def _click_share(spec: FeatureSpec) -> float:
    """Mean share of a student's squared gradient on the LSTM weights reading the clicks."""
    inputs = _oulad_inputs(spec=spec)
    torch.manual_seed(0)
    n_static = inputs.static.shape[1]
    model = build_model("lstm", WEEKS, len(spec.dynamic), n_static, {"use_static": False})
    names = [name for name, _ in model.named_parameters()]
    index = names.index("rnn.weight_ih_l0")  # (4 x hidden, features + mask)
    clicks = [i for i, f in enumerate(spec.dynamic) if f.name.startswith("clicks_")]
    batch = input_tensors(inputs)
    shares = []
    for i in range(len(inputs)):
        one = tuple(t[i : i + 1] for t in batch)
        loss = task_loss(model(*one[:3]), one[3], one[4], "risk")
        grads = torch.autograd.grad(loss, list(model.parameters()))
        total = sum(float((g**2).sum()) for g in grads)
        shares.append(float((grads[index][:, clicks] ** 2).sum()) / total)
    return float(np.mean(shares))


def test_an_ordinary_week_of_clicks_is_an_input_of_about_one() -> None:
    spec = _spec()
    inputs = _oulad_inputs(spec=spec)  # 10 clicks a week per type (2 for at-risk students)
    linear = _oulad_inputs(spec=_linear(spec))
    clicks = [i for i, f in enumerate(spec.dynamic) if f.name.startswith("clicks_")]
    assert np.median(inputs.dynamic[..., clicks]) > 0.8
    assert np.median(linear.dynamic[..., clicks]) < 0.15


def test_the_click_weights_hold_a_real_share_of_the_per_student_gradient() -> None:
    spec = _spec()
    shipped, linear = _click_share(spec), _click_share(_linear(spec))
    assert linear < 0.03  # what DP-SGD's clipping and noise drowned (1.2.0: about 0.01)
    assert shipped > 0.15  # 1.3.0: about 0.28
