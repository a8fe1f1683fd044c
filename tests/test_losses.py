"""Each loss term, the schedules and the samplers against hand computation on small tensors."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_senseflow import flow, losses
from megatron_senseflow.models.configs import make_arch
from megatron_senseflow.sampling import sample_euler, sample_student


def test_paper_flux_anchors_come_from_the_shift_formula():
    m = flow.default_shift(make_arch("flux-dev"), 4096, 4)  # 1024 px: 64 x 64 packed tokens
    assert m == pytest.approx(math.exp(1.15))
    # the paper prints them truncated to 3 decimals
    assert [math.floor(a * 1000) / 1000 for a in flow.anchors(4, m)] == [1.0, 0.904, 0.759, 0.512]
    assert flow.default_shift(make_arch("flux-dev"), 256, 4) == pytest.approx(math.exp(0.5))
    assert flow.anchors(4, 3.0) == pytest.approx([1.0, 0.9, 0.75, 0.5])  # SD3.x, shift 3


def test_noise_x0_euler_conventions():
    x0, eps = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    s = torch.tensor([0.25])
    xs = flow.noise(x0, eps, s)
    assert xs.item() == pytest.approx(0.75 * 2 - 0.25)
    v = eps - x0  # the true velocity
    assert flow.x0_from_v(xs, s, v).item() == pytest.approx(2.0)
    assert flow.euler(xs, s, torch.tensor([0.0]), v).item() == pytest.approx(2.0)
    assert flow.next_anchor([1.0, 0.5], torch.tensor([0, 1])).tolist() == [0.5, 0.0]


def test_dmd_gradient_and_loss_by_hand():
    x0_hat = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    x0_real = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    x0_fake = torch.tensor([[0.5, 1.0], [0.0, 0.0]])
    p_real = x0_hat - x0_real  # [[1, 2], [-1, -2]]
    p_fake = x0_hat - x0_fake  # [[0.5, 1], [0, -1]]
    want = (p_real - p_fake) / torch.tensor([[1.5], [1.5]])
    g = losses.dmd_gradient(x0_hat, x0_real, x0_fake)
    assert torch.allclose(g, want)
    x = x0_hat.clone().requires_grad_(True)
    loss = losses.dmd_loss(x, g)
    assert loss.item() == pytest.approx(0.5 * g.square().mean().item())
    loss.backward()
    assert torch.allclose(x.grad, g / g.numel())  # the DMD update direction


def test_pseudo_huber_by_hand():
    x, y, c = torch.tensor([0.0, 3.0]), torch.tensor([4.0, 3.0]), 1e-3
    want = ((math.sqrt(16 + c * c) - c) + 0.0) / 2
    assert losses.pseudo_huber(x, y, c).item() == pytest.approx(want)
    xg = x.clone().requires_grad_(True)
    losses.isg_loss(xg, y.clone().requires_grad_(True), c).backward()
    assert xg.grad[0].item() == pytest.approx(-4 / math.sqrt(16 + c * c) / 2)


def test_flow_matching_loss_by_hand():
    v, eps, x0 = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    # target eps - x0 = [1, -1]; errors [0, 2]: mean over elements (SenseFlow), per-sample sum (SiD-DiT)
    assert losses.flow_matching_loss(v, eps, x0).item() == pytest.approx(2.0)
    assert losses.flow_matching_loss(v, eps, x0, "sum").item() == pytest.approx(4.0)


def test_gan_terms_are_the_authors_per_location_hinge_times_the_time_weight():
    """GANLoss(hinge) with keepdim=True (their vfmgan.py): the generator's -mean over locations, the
    discriminator's relu(1 -/+ logit) mean over locations; each per sample times timew, then the batch mean."""
    torch.manual_seed(0)
    real, fake = torch.randn(3, 7), torch.randn(3, 7)
    timew = torch.tensor([0.0, 0.25, 1.0])
    l_d_real = torch.mean(torch.relu(1 + -real).mean(dim=1) * timew)
    l_d_fake = torch.mean(torch.relu(1 + fake).mean(dim=1) * timew)
    got_real, got_fake = losses.hinge_d_terms(real, fake, timew)
    assert got_real.item() == pytest.approx(l_d_real.item()) and got_fake.item() == pytest.approx(l_d_fake.item())
    # hinge per location differs from hinge of the mean logit (what this project did before)
    mean_hinge = torch.relu(1 - real.mean(1)).mul(timew).mean()
    assert abs(mean_hinge.item() - l_d_real.item()) > 1e-3
    l_g_gan = (-fake.mean(dim=1) * timew).mean()
    assert losses.gan_generator_loss(fake, timew).item() == pytest.approx(l_g_gan.item())


def test_sid_loss_by_hand():
    """SiD-DiT: loss = (y_r - y_f) * ((y_r - x_g) - alpha (y_r - y_f)) * w, summed, times lsg / batch."""
    xg = torch.tensor([[1.0, 0.0], [0.5, 2.0]], requires_grad=True)
    yr = torch.tensor([[2.0, 1.0], [0.0, 1.0]], requires_grad=True)
    yf = torch.tensor([[1.0, 3.0], [1.0, 1.0]], requires_grad=True)
    w = torch.tensor([0.5, 0.25])
    alpha, lsg = 1.2, 100.0
    ref = ((yr - yf) * ((yr - xg) - alpha * (yr - yf)) * w[:, None]).sum() * lsg / 2
    ref_grads = torch.autograd.grad(ref, (xg, yr, yf))
    loss = losses.sid_loss(xg, yr, yf, w, alpha, lsg)
    assert loss.item() == pytest.approx(ref.item())
    for got, want in zip(torch.autograd.grad(loss, (xg, yr, yf)), ref_grads):
        assert torch.allclose(got, want)  # differentiable in y_r and y_f too: no stop-gradient
    s = torch.tensor([0.25])
    x, y = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    assert losses.sid_weight(s, "one_minus_sigma").item() == pytest.approx(0.75)
    assert losses.sid_weight(s, "one_minus_sigma_sq").item() == pytest.approx(0.5625)
    assert losses.sid_weight(s, "inv_sigma").item() == pytest.approx(4.0)
    assert losses.sid_weight(s, "inv_sigma_sq").item() == pytest.approx(16.0)
    assert losses.sid_weight(s, "snr").item() == pytest.approx(9.0)
    assert losses.sid_weight(s, "snr_sqrt").item() == pytest.approx(3.0)
    assert losses.sid_weight(s, "legacy", x, y).item() == pytest.approx(1 / 1.5)  # 1 / mean|x_g - y_real|


def _linear_velocity(a: float):
    """v(x, s) = a * x: closed-form steps to check the samplers."""
    return lambda x, s: a * x


def test_student_euler_sampler_by_hand():
    taus = [1.0, 0.5]
    x = torch.tensor([[2.0]])
    # step 1: v = 0.5*2 = 1; x -> 2 + (0.5 - 1) * 1 = 1.5 ; step 2: v = 0.75, x0 = 1.5 - 0.5*0.75 = 1.125
    out = sample_student(_linear_velocity(0.5), x, taus, "euler")
    assert out.item() == pytest.approx(1.125)


def test_student_stochastic_sampler_by_hand():
    taus = [1.0, 0.5]
    x = torch.tensor([[2.0]])
    g = torch.Generator().manual_seed(0)
    eps = torch.randn((1, 1), generator=torch.Generator().manual_seed(0))
    # step 1: x0 = 2 - 1 * 1 = 1; renoise to 0.5: 0.5 * 1 + 0.5 * eps; step 2: x0 = x - 0.5 * 0.5 x = 0.75 x
    want = 0.75 * (0.5 * 1.0 + 0.5 * eps.item())
    assert sample_student(_linear_velocity(0.5), x, taus, "stochastic", g).item() == pytest.approx(want)


def test_teacher_euler_sampler_by_hand():
    out = sample_euler(_linear_velocity(1.0), torch.tensor([[1.0]]), [1.0, 0.5, 0.0])
    # x <- x + (s_next - s) x: 1 * 0.5 = 0.5, then 0.5 * 0.5 = 0.25
    assert out.item() == pytest.approx(0.25)
