"""MART (aaa_fast/methods/mart.py) against a hand-computed loss, the authors' published formula
and a plain training loop."""
import math

import pytest
import torch
import torch.nn.functional as F

import aaa_fast
from aaa_fast.methods.mart import mart_terms

from test_trainer import make_trainer, small_cnn, toy_problem


def published_mart_loss(nat_logits, adv_logits, y, beta):
    """MART's loss as the authors published it (Wang et al., ICLR 2020, their mart_loss): boosted
    CE through argsort and nll_loss, the KL through KLDivLoss on log(adv + 1e-12)."""
    adv_probs = F.softmax(adv_logits, dim=1)
    order = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(order[:, -1] == y, order[:, -2], order[:, -1])
    loss_adv = F.cross_entropy(adv_logits, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(nat_logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1)).squeeze()
    kl = torch.nn.KLDivLoss(reduction="none")
    loss_robust = (1.0 / y.shape[0]) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    return loss_adv + beta * loss_robust


def test_mart_loss_by_hand():
    # one row, three classes: clean logits (0, 1, 2), adversarial (1, 0, 0), label 2
    nat, adv, y = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([2])
    e = math.e
    q = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]          # adversarial probabilities
    p = [1 / (1 + e + e * e), e / (1 + e + e * e), e * e / (1 + e + e * e)]  # clean probabilities
    # most likely wrong class on the adversarial example: class 0 (the label 2 is not the top one)
    boosted = -math.log(q[2]) - math.log(1.0001 - q[0] + 1e-12)
    kl = sum(pk * (math.log(pk) - math.log(qk + 1e-12)) for pk, qk in zip(p, q))
    weighted = kl * (1.0000001 - p[2])
    b, w, ce = mart_terms(nat, adv, y)
    assert b.item() == pytest.approx(boosted, rel=1e-6)
    assert w.item() == pytest.approx(weighted, rel=1e-6)
    assert ce.item() == pytest.approx(-math.log(p[2]), rel=1e-6)


def test_mart_matches_the_published_formula():
    g = torch.Generator().manual_seed(0)
    nat, adv = torch.randn(64, 10, generator=g) * 3, torch.randn(64, 10, generator=g) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    y[:8] = adv[:8].argmax(1)  # rows whose label is the adversarial top class: the second one is boosted
    b, w, _ = mart_terms(nat, adv, y)
    assert (b + 6.0 * w).item() == pytest.approx(published_mart_loss(nat, adv, y, 6.0).item(), rel=1e-6)


def test_mart_step_equals_pgd_ce_then_the_published_loss():
    x, y = toy_problem()
    trainer = make_trainer("mart", eps=0.1, alpha=0.03, seed=0)
    assert trainer.config.lam == 6.0
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        stats = trainer.step(x, y)
        x_adv = aaa_fast.perturb(model, x, y, eps=0.1, alpha=0.03, steps=3, random_start="normal", generator=gen)
        logits = model.train()(torch.cat([x, x_adv]))  # one forward of the clean and adversarial rows
        loss = published_mart_loss(logits[:32], logits[32:], y, 6.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for p, q in zip(trainer.model.parameters(), model.parameters()):
        # float32 convolutions differ in their last bits from one CPU kernel choice (and thread
        # split) to another: up to 1.5e-5 seen on an AVX2 CPU; a wrong loss moves the weights by
        # lr x gradient, ~1e-3
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-4)
