"""README.md's Python examples run as written (on the CPU: `.cuda()` dropped), and do what their
comments say."""
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from aaa_fast.models import build_model

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def example(heading: str) -> str:
    """The first ```python block of the README section that starts with `heading`."""
    section = README.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1).replace(".cuda()", "")


def cifar_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 10


def test_fused_step_example():
    scope = {}
    exec(example("The fused PGD step"), scope)
    x_adv, x_nat, eps = scope["x_adv"], scope["x_nat"], scope["eps"]
    assert (x_adv - x_nat).abs().amax(dim=(1, 2, 3)).le(eps + 1e-6).all()  # inside each ball
    assert 0 <= x_adv.min() and x_adv.max() <= 1


def test_attack_engine_example():
    torch.manual_seed(0)
    model = build_model("small-cnn", in_channels=3, num_classes=10)
    x, y = cifar_batch(8, 0)
    scope = dict(model=model, x=x, y=y, d=torch.tensor([1, -1] * 4), eps_rows=torch.full((8,), 4 / 255))
    exec(example("The attack engine"), scope)
    for name, bound in (("x_mix", 4 / 255), ("x_adv", 10 / 255), ("x_anti", 10 / 255)):  # x_adv: the pair's
        assert (scope[name] - x).abs().max() <= bound + 1e-6, name
    model.eval()
    with torch.no_grad():
        clean = model(x)
        noise = (x + (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 1) * 10 / 255).clamp(0, 1)
        kl = {name: F.kl_div(F.log_softmax(model(z), 1), F.softmax(clean, 1), reduction="batchmean")
              for name, z in (("x_adv", scope["x_adv"]), ("noise", noise))}
        # the adversarial rows move the prediction more than random noise of the same size; the
        # anti-adversarial rows lower the cross-entropy of the labels
        assert kl["x_adv"] > 10 * kl["noise"]
        assert F.cross_entropy(model(scope["x_anti"]), y) < F.cross_entropy(clean, y)


def test_training_step_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example saves state.pt where it runs
    x, y = cifar_batch(8, 0)
    x_meta, y_meta = cifar_batch(10, 1)
    scope = dict(epochs=1, loader=[(x, y), ((x * 255).to(torch.uint8), y)], meta_batches=iter([(x_meta, y_meta)] * 2),
                 x_meta_all=x_meta, y_meta_all=y_meta)
    code = example("The AAA training step").replace('"preact-resnet18"', '"resnet32"')  # a smaller CIFAR net
    exec(code, scope)
    trainer = scope["trainer"]
    assert trainer.config.eps == 10 / 255 and trainer.config.lam == 1.5  # the defaults the comment names
    assert scope["means"]["steps"] == 2 and torch.isfinite(torch.tensor(scope["means"]["loss"]))
    assert {"loss", "natural", "boundary", "anti", "mean_eps", "frac_anti", "grad_band"} <= set(scope["stats"])
    assert (tmp_path / "state.pt").exists()
