"""The way the reference implementation (and most research code) builds the AAA pair and a PGD
attack: separate loops, the clean forward recomputed every step, plain tensor arithmetic."""
import torch
import torch.nn.functional as F


def plain_pgd(model, x, y, eps, alpha, steps):
    """Textbook PGD-CE (mean loss, Python-float bounds), no random start."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    return x_adv


def reference_pair(model, x, y, eps, alpha, steps):
    """TRADES-KL adversarial and CE anti-adversarial examples as two attacks: per step three
    forwards (x_adv, the clean x again, x_anti) and two backwards."""
    x_adv = x + 0.001 * torch.randn_like(x)
    x_anti = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(loss_kl, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)

        x_anti.requires_grad_(True)
        loss_ce = F.cross_entropy(model(x_anti), y)
        (grad,) = torch.autograd.grad(loss_ce, x_anti)
        x_anti = x_anti.detach() - alpha * grad.sign()
        x_anti = torch.clamp(torch.min(torch.max(x_anti, x - eps), x + eps), 0.0, 1.0)
    return x_adv, x_anti
