"""Model zoo shapes and layouts; class-wise evaluation arithmetic on a hand-checked case."""
import pytest
import torch
from torch import nn

from aaa_fast.evaluation import ClasswiseResult, classwise_accuracy
from aaa_fast.models import ARCHS, build_model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_forward_and_channels_last(arch):
    channels, size = (1, 28) if arch == "small-cnn" else (3, 32)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_channels=channels).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        out = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, cl, atol=1e-4, rtol=1e-4)


def test_normalisation_is_a_layer():
    model = build_model("small-cnn", mean=(0.5,), std=(0.25,), in_channels=1)
    x = torch.full((1, 1, 2, 2), 0.75)
    assert torch.allclose(model.normalize(x), torch.ones_like(x))
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="std must be > 0"):
        build_model("small-cnn", mean=(0.5,), std=(0.0,), in_channels=1)


class LookupModel(nn.Module):
    """Predicts from the first pixel: value k/10 -> class k; PGD cannot move it (eps = 0)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        k = (x[:, 0, 0, 0] * 10).round().long()
        return nn.functional.one_hot(k, 3).float() * self.scale


def test_classwise_arithmetic_hand_checked():
    # labels 0,0,0,1,1,2; predictions 0,0,1,1,2,2 -> class acc (2/3, 1/2, 1)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    x = (pred.float() / 10).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    res = classwise_accuracy(LookupModel(), x, y, 3, eps=0.0, steps=0, batch_size=4)
    torch.testing.assert_close(res.nat_acc, torch.tensor([2 / 3, 1 / 2, 1.0], dtype=torch.float64))
    assert res.counts.tolist() == [3, 2, 1]
    s = res.summary()
    assert s["avg_nat_err"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 0) / 3)
    assert s["worst_nat_err"] == pytest.approx(50.0)
    assert s["clean_acc"] == pytest.approx(100 * 4 / 6)


def test_boundary_and_robust_errors():
    res = ClasswiseResult(nat_acc=torch.tensor([0.9, 0.6]), rob_acc=torch.tensor([0.5, 0.1]),
                          counts=torch.tensor([10.0, 30.0]))
    s = res.summary()
    assert s["avg_bdy_err"] == pytest.approx(45.0) and s["worst_bdy_err"] == pytest.approx(50.0)
    assert s["avg_rob_err"] == pytest.approx(70.0) and s["worst_rob_err"] == pytest.approx(90.0)
    assert s["pgd_acc"] == pytest.approx(100 * (5 + 3) / 40)


def test_uint8_images_are_pixels_over_255():
    """classwise_accuracy on uint8 images equals the same images as floats / 255 (PGD included)."""
    torch.manual_seed(0)
    model = build_model("small-cnn", in_channels=1, num_classes=4)
    pixels = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    y = torch.arange(12) % 4
    runs = [classwise_accuracy(model, x, y, 4, eps=0.1, steps=2, alpha=0.05, generator=torch.Generator().manual_seed(1))
            for x in (pixels, pixels.float() / 255)]
    torch.testing.assert_close(runs[0].nat_acc, runs[1].nat_acc)
    torch.testing.assert_close(runs[0].rob_acc, runs[1].rob_acc)
