"""aaa_fast.run and the CLI's settings: every trainer setting has one home (AAAConfig, with the
per-method defaults in trainer.fill_defaults), and the flags map onto it without a second copy."""
import dataclasses
import math

import pytest
import torch

from aaa_fast.meta import INIT_TEMPERATURE, MetaNet
from aaa_fast.run import trainer_config
from aaa_fast.train import build_parser, resolve_defaults
from aaa_fast.trainer import AAAConfig, make_meta_net, make_meta_optimizer

BALANCED = torch.full((10,), 100)
# AAAConfig fields the run derives rather than reads from a flag of the same name
DERIVED = {"num_classes", "class_share", "fairness_eval_eps", "fairness_eval_steps"}


def cli_config(*flags: str) -> AAAConfig:
    args = resolve_defaults(build_parser().parse_args(["--device", "cpu", *flags]))
    return trainer_config(args, 10, BALANCED)


@pytest.mark.parametrize("method,eps,lam,bound_mode,fairness", [
    ("erm", 8 / 255, 6.0, "fixed", False), ("pgd-at", 8 / 255, 6.0, "fixed", False),
    ("trades", 8 / 255, 6.0, "fixed", False), ("frl", 8 / 255, 6.0, "remargin", True),
    ("aaa", 10 / 255, 1.5, "remargin", True), ("aaa-fixed", 10 / 255, 1.5, "remargin", True),
    ("aaa-oracle", 10 / 255, 1.5, "remargin", True), ("mart", 8 / 255, 6.0, "fixed", False),
])
def test_per_method_defaults(method, eps, lam, bound_mode, fairness):
    config = AAAConfig(method=method)
    assert (config.eps, config.alpha, config.lam) == (eps, eps / 4, lam)
    assert (config.bound_mode, config.fairness) == (bound_mode, fairness)
    # the CLI resolves the same defaults (CIFAR-10: no data set bound of its own)
    noise = ["--label-noise", "uniform", "--noise-rate", "0.2"] if method == "aaa-oracle" else []
    assert cli_config("--method", method, *noise) == dataclasses.replace(config, class_share=[0.1] * 10)


def test_given_values_win_over_defaults():
    config = AAAConfig(method="trades", eps=0.2, lam=2.0, fairness=True, bound_mode="remargin")
    assert (config.eps, config.alpha, config.lam, config.fairness, config.bound_mode) == (0.2, 0.05, 2.0, True, "remargin")


def test_meta_init_sets_temperature_and_guard():
    assert (AAAConfig().temperature, AAAConfig().anti_cap) == (0.05, 0.5)
    ref = AAAConfig(meta_init="reference")
    assert (ref.temperature, ref.anti_cap) == (1e-3, 1.0)
    assert MetaNet(init="reference").temperature == INIT_TEMPERATURE["reference"] == 1e-3
    assert cli_config("--meta-init", "reference").temperature == 1e-3


def test_fashion_mnist_bound_is_the_data_sets():
    config = cli_config("--dataset", "fashion-mnist", "--method", "trades")
    assert (config.eps, config.alpha, config.fairness_eval_eps) == (0.1, 0.025, 0.1)


def test_every_config_field_has_a_flag_or_a_stated_reason():
    args = vars(build_parser().parse_args([]))
    fields = {f.name for f in dataclasses.fields(AAAConfig)}
    assert fields - set(args) == DERIVED
    # each mapped flag reaches the config: a non-default value on the command line is the config's value
    config = cli_config("--method", "aaa", "--eps", "0.2", "--alpha", "0.03", "--steps", "4", "--lam", "2",
                        "--bound-mode", "meta", "--no-fairness", "--objective", "paper", "--meta-init", "reference",
                        "--temperature", "0.3", "--anti-cap", "0.7", "--meta-every", "7", "--meta-lr", "0.01",
                        "--meta-weight-decay", "0", "--meta-hidden", "16", "--meta-start-a", "0.6", "--amp", "bf16",
                        "--channels-last", "--compile", "--no-cuda-graphs", "--seed", "3", "--skip-nonfinite",
                        "--eval-eps", "0.05", "--eval-steps", "5", "--norm", "l2", "--adv-loss", "ce", "--s-min",
                        "0.25", "--s-max", "1.5", "--fixed-weights", "0.3", "0.7", "--tau", "0.1", "--rho1", "0.02",
                        "--rho2", "0.3")
    assert dataclasses.asdict(config) == dict(
        dataclasses.asdict(AAAConfig()), method="aaa", eps=0.2, alpha=0.03, steps=4, lam=2.0, bound_mode="meta",
        fairness=False, objective="paper", meta_init="reference", temperature=0.3, anti_cap=0.7, meta_every=7,
        meta_lr=0.01, meta_weight_decay=0.0, meta_hidden=16, meta_start_a=0.6, amp="bf16", channels_last=True,
        compile=True, cuda_graphs=False, seed=3, skip_nonfinite=True, fairness_eval_eps=0.05, fairness_eval_steps=5,
        class_share=[0.1] * 10, norm="l2", adv_loss="ce", s_min=0.25, s_max=1.5, fixed_weights=(0.3, 0.7), tau=0.1,
        rho1=0.02, rho2=0.3)


def test_meta_net_and_optimizer_follow_the_config():
    config = AAAConfig(meta_hidden=16, meta_start_a=0.6, meta_lr=0.01, meta_weight_decay=0.0)
    net = make_meta_net(config, seed=0)
    assert net.net[1].out_features == 16
    bias = net.net[-1].bias  # the rows' split is centred on logit(start_a) = (bias_a - bias_b) / T
    assert ((bias[0] - bias[1]) / config.temperature).item() == pytest.approx(math.log(0.6 / 0.4), rel=1e-5)
    group = make_meta_optimizer(config, net).param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.0)


@pytest.mark.parametrize("kwargs,text", [
    (dict(meta_hidden=0), "meta_hidden must be an int >= 1"), (dict(meta_start_a=1.0), "meta_start_a must be in"),
    (dict(meta_lr=float("nan")), "meta_lr must be finite"), (dict(meta_weight_decay=-1.0), "meta_weight_decay must be"),
])
def test_meta_setting_errors(kwargs, text):
    with pytest.raises(ValueError, match=text):
        AAAConfig(**kwargs)


@pytest.mark.parametrize("flags,expected", [({"amx_bf16", "avx2"}, "bf16"), ({"avx512_bf16"}, "bf16"),
                                            ({"avx2", "avx512f"}, "none"), (set(), "none")])
def test_amp_auto_picks_bf16_only_on_cpus_with_native_bf16(monkeypatch, flags, expected):
    from aaa_fast import model_io
    monkeypatch.setattr(model_io, "cpu_flags", lambda: flags)
    amp, why = model_io.resolve_amp("auto", "cpu")
    assert amp == expected and why.startswith("auto: ")
    assert model_io.resolve_amp("fp16", "cpu") == ("fp16", "as asked")  # a precision asked for is kept
    args = resolve_defaults(build_parser().parse_args(["--amp", "auto", "--device", "cpu"]))
    assert (args.amp, args.channels_last) == (expected, expected == "bf16")  # bf16 comes with channels_last
    explicit = resolve_defaults(build_parser().parse_args(["--amp", "bf16", "--device", "cpu"]))
    assert (explicit.amp, explicit.channels_last, explicit.amp_choice) == ("bf16", False, "as asked")


@pytest.mark.parametrize("supported,expected", [(True, "bf16"), (False, "none")])
def test_amp_auto_on_cuda_follows_the_devices_bf16_support(monkeypatch, supported, expected):
    from aaa_fast import model_io
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return supported
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "Some GPU")
    amp, why = model_io.resolve_amp("auto", "cuda")
    assert amp == expected and "Some GPU" in why and calls == [False]  # emulated bf16 does not count


def test_trainer_amp_auto_resolves_once_to_bf16_with_channels_last(monkeypatch):
    from aaa_fast import AAATrainer, model_io
    from aaa_fast.models import build_model
    monkeypatch.setattr(model_io, "cpu_flags", lambda: {"amx_bf16"})
    torch.manual_seed(0)
    model = build_model("small-cnn", in_channels=1, num_classes=4)
    trainer = AAATrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         config=AAAConfig(method="pgd-at", num_classes=4, steps=1, amp="auto"))
    assert (trainer.config.amp, trainer.config.channels_last, trainer.amp_dtype) == ("bf16", True, torch.bfloat16)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert "amx_bf16" in trainer.amp_choice
    monkeypatch.setattr(model_io, "cpu_flags", lambda: set())
    plain = AAATrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       config=AAAConfig(method="pgd-at", num_classes=4, steps=1, amp="auto"))
    assert (plain.config.amp, plain.amp_dtype) == ("none", None)
