"""aaa_fast.diagnostics: AUROC against scipy's Mann-Whitney U and hand values; group shares by hand."""
import math

import pytest
import torch
from scipy.stats import mannwhitneyu

from aaa_fast.diagnostics import GROUP_FIELDS, ChoiceDiagnostics, auroc, tail_classes


def test_auroc_hand_values():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert auroc(torch.tensor([0.2, 0.2, 0.2]), torch.tensor([1, 0, 0])) == 0.5  # ties count half
    assert auroc(torch.tensor([0.9, 0.1]), torch.tensor([1, 0])) == 1.0
    assert math.isnan(auroc(torch.tensor([0.9, 0.1]), torch.tensor([0, 0])))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_mann_whitney_u_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 7, (200,), generator=g).float() / 7  # many ties
    positive = torch.rand(200, generator=g) < 0.3
    u = mannwhitneyu(scores[positive].numpy(), scores[~positive].numpy()).statistic
    assert auroc(scores, positive) == pytest.approx(u / (int(positive.sum()) * int((~positive).sum())), rel=1e-12)


def test_group_shares_by_hand():
    corrupted = torch.tensor([True, False, False, True, False, False])
    tail = torch.tensor([False, True, False])  # class 1 is the tail
    true_labels = torch.tensor([0, 1, 1, 2, 0, 1])
    diag = ChoiceDiagnostics(corrupted, tail)
    # two batches: rows (0, 1, 2) then (3, 4, 5); anti where b > a
    diag.add(torch.tensor([0, 1, 2]), torch.tensor([0.2, 0.9, 0.3]), torch.tensor([0.8, 0.1, 0.7]))
    diag.add(torch.tensor([3, 4, 5]), torch.tensor([0.6, 0.9, 0.1]), torch.tensor([0.4, 0.1, 0.9]))
    out = diag.summary(true_labels)
    assert out["anti_share_corrupted"] == 0.5  # rows 0 (anti), 3 (not)
    assert out["anti_share_clean"] == 0.5  # rows 1, 2, 4, 5: 2 and 5 anti
    assert out["anti_share_tail"] == pytest.approx(2 / 3)  # class 1: rows 1, 2, 5
    assert out["anti_share_head"] == pytest.approx(1 / 3)  # rows 0, 3, 4
    # b of corrupted rows: 0.8, 0.4; of clean rows: 0.1, 0.7, 0.1, 0.9 -> 5 of 8 pairs won
    assert out["anti_auroc_corrupted"] == pytest.approx(5 / 8)
    restored = ChoiceDiagnostics(corrupted, tail)
    restored.load_state_dict(diag.state_dict())
    assert restored.summary(true_labels) == out
    diag.reset()
    assert diag.summary(true_labels) == dict.fromkeys(GROUP_FIELDS, "")


def test_groups_that_do_not_exist_stay_blank():
    diag = ChoiceDiagnostics(torch.zeros(4, dtype=torch.bool), None)  # no noise, balanced
    diag.add(torch.arange(4), torch.full((4,), 0.9), torch.full((4,), 0.1))
    assert diag.summary(torch.arange(4) % 2) == dict.fromkeys(GROUP_FIELDS, "")


def test_tail_classes_are_the_smaller_half():
    assert tail_classes(torch.tensor([5, 5, 5])) is None
    assert tail_classes(torch.tensor([100, 3, 50, 10])).tolist() == [False, True, False, True]
    assert tail_classes(torch.tensor([9, 1, 4, 2, 7])).tolist() == [False, True, False, True, False]


def test_distributions_by_hand():
    """mechanism.png's data: each group's b_i histogram as shares of its rows, and the mean eps_i
    per true class, from rows added over two steps."""
    corrupted = torch.tensor([True, False, False, True, False, False])
    diag = ChoiceDiagnostics(corrupted, None)
    true_labels = torch.tensor([0, 1, 1, 2, 0, 2])
    diag.add(torch.tensor([0, 1, 2]), torch.zeros(3), torch.tensor([0.95, 0.05, 0.15]), torch.tensor([0.1, 0.2, 0.3]))
    diag.add(torch.tensor([3, 4, 5]), torch.zeros(3), torch.tensor([0.85, 0.05, 0.05]), torch.tensor([0.4, 0.5, 0.6]))
    got = diag.distributions(true_labels, num_classes=4, bins=10)
    assert got["bins"] == 10 and set(got["b_hist"]) == {"corrupted labels", "clean labels"}
    bad = got["b_hist"]["corrupted labels"]  # rows 0 and 3: b 0.95 and 0.85
    assert bad[9] == pytest.approx(0.5) and bad[8] == pytest.approx(0.5) and sum(bad) == pytest.approx(1)
    clean = got["b_hist"]["clean labels"]  # rows 1, 2, 4, 5: b 0.05, 0.15, 0.05, 0.05
    assert clean[0] == pytest.approx(0.75) and clean[1] == pytest.approx(0.25)
    # class 0: rows 0, 4 (0.1, 0.5); class 1: rows 1, 2 (0.2, 0.3); class 2: rows 3, 5 (0.4, 0.6); class 3: none
    eps = got["eps_per_class"]
    assert eps[:3] == pytest.approx([0.3, 0.25, 0.5]) and math.isnan(eps[3])
    # restored mid-epoch from a checkpoint, the same; no eps given: no class-wise bounds
    again = ChoiceDiagnostics(corrupted, None)
    again.load_state_dict(diag.state_dict())
    assert again.distributions(true_labels, 4, bins=10)["b_hist"] == got["b_hist"]
    plain = ChoiceDiagnostics(None, None)
    plain.add(torch.tensor([0, 1]), torch.zeros(2), torch.tensor([0.5, 0.5]))
    assert plain.distributions(true_labels, 4)["eps_per_class"] is None
    assert list(plain.distributions(true_labels, 4)["b_hist"]) == ["all rows"]
    assert ChoiceDiagnostics(None, None).distributions(true_labels, 4) is None
