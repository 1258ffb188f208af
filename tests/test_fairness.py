"""FRL's fairness multipliers against hand-computed updates."""
import math

import pytest
import torch

from aaa_fast.fairness import FairnessMultipliers


def test_multiplier_update_against_hand_values():
    m = FairnessMultipliers(3)
    m.update([0.1, 0.2, 0.6], [0.3, 0.1, 0.2])
    # gamma = e - 0.3 - 0.07 = (-0.27, -0.17, 0.23) -> nu = clamp(0.05 gamma, 0) = (0, 0, 0.0115)
    # kappa = r - 0.2 - 0.07 = (0.03, -0.17, -0.07) -> eta = clamp(0.1 kappa, 0) = (0.003, 0, 0); mu = 0.2 kappa
    torch.testing.assert_close(m.nu, torch.tensor([0.0, 0.0, 0.0115], dtype=torch.float64))
    torch.testing.assert_close(m.eta, torch.tensor([0.003, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(m.mu, torch.tensor([0.006, -0.034, -0.014], dtype=torch.float64))
    u, v = m.class_weights()
    torch.testing.assert_close(u, torch.tensor([1 / 3 - 0.0115 / 3, 1 / 3 - 0.0115 / 3, 1 / 3 + 2 * 0.0115 / 3]))
    torch.testing.assert_close(v, torch.tensor([1 / 3 + 2 * 0.001, 1 / 3 - 0.001, 1 / 3 - 0.001]))
    torch.testing.assert_close(m.bound_multipliers(), torch.tensor([math.exp(0.012), 0.98, 0.98]))


def test_multiplier_cap_halving_and_state():
    m = FairnessMultipliers(2, tau=0.0, rho1=1.0)
    m.update([1.0, 0.0], [0.0, 0.0])  # gamma = (0.5, -0.5): nu = (0.5, 0) already at the cap
    m.update([1.0, 0.0], [0.0, 0.0])  # nu + gamma = (1.0, 0) -> rescaled to sum 0.5
    torch.testing.assert_close(m.nu, torch.tensor([0.5, 0.0], dtype=torch.float64))
    halving = FairnessMultipliers(2, tau=0.0, rho1=0.1, halve_every=2)
    steps = []
    for _ in range(4):
        before = halving.nu.clone()
        halving.update([0.1, 0.0], [0.0, 0.0])  # gamma_0 = 0.05
        steps.append((halving.nu - before)[0].item())
    assert steps == pytest.approx([0.005, 0.005, 0.0025, 0.0025])
    restored = FairnessMultipliers(2)
    restored.load_state_dict(halving.state_dict())
    assert torch.equal(restored.nu, halving.nu) and restored.updates == 4
    with pytest.raises(ValueError, match="classwise_nat_err must have shape"):
        m.update([0.1, 0.2, 0.3], [0.0, 0.0])
    with pytest.raises(ValueError, match="must be finite"):
        m.update([float("nan"), 0.2], [0.0, 0.0])
