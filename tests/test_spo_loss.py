"""The SPO loss: ln 2 at init, zero gradient once the ratio is clamped, the right sign otherwise."""

import math

import pytest
import torch

from spo.training.spo_loss import spo_loss


def loss_of(logp_win, logp_lose, ref_win=0.0, ref_lose=0.0, beta=10.0, eps=0.1):
    lw = torch.tensor([logp_win], requires_grad=True)
    ll = torch.tensor([logp_lose], requires_grad=True)
    out = spo_loss(lw, ll, torch.tensor([ref_win]), torch.tensor([ref_lose]), beta=beta, clip_eps=eps)
    out.loss.backward()
    return out, lw.grad.item(), ll.grad.item()


def test_loss_is_ln2_when_policy_equals_reference():
    out, gw, gl = loss_of(-1.3, -0.7, -1.3, -0.7)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    # d/dlogp_w of -log σ(β(lw - ll)) at margin 0 = -β/2
    assert gw == pytest.approx(-5.0, rel=1e-5) and gl == pytest.approx(5.0, rel=1e-5)


def test_clamped_ratio_has_zero_gradient():
    out, gw, gl = loss_of(0.5, -0.5)  # ratios e^0.5 = 1.65 > 1.1 and e^-0.5 = 0.61 < 0.9
    assert gw == 0.0 and gl == 0.0
    floor = -math.log(1 / (1 + math.exp(-10 * math.log(1.1 / 0.9))))
    assert out.loss.item() == pytest.approx(floor, rel=1e-6)  # ≈ 0.126, the lowest reachable loss
    assert out.ratio_win.item() == pytest.approx(math.exp(0.5), rel=1e-6)  # logged unclamped


def test_loss_decreases_when_winner_gains_probability():
    inside, _, _ = loss_of(0.05, 0.0)
    assert inside.loss.item() < math.log(2)
    reverse, _, _ = loss_of(0.0, 0.05)
    assert reverse.loss.item() > math.log(2)


def test_reference_gets_no_gradient():
    ref = torch.tensor([0.0], requires_grad=True)
    out = spo_loss(torch.tensor([0.01], requires_grad=True), torch.tensor([0.0]), ref, torch.tensor([0.0]),
                   beta=10.0, clip_eps=0.1)
    out.loss.backward()
    assert ref.grad is None
