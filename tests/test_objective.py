"""The AAA objective and the per-sample features against hand values."""
import math

import pytest
import torch

from aaa_fast.objective import sample_features, weighted_objective

LN2, LN3 = math.log(2), math.log(3)


def test_three_terms_against_hand_computation():
    y = torch.tensor([0, 1, 0])
    # softmax rows: (1/2, 1/2), (1/2, 1/2), (3/4, 1/4)
    nat = torch.tensor([[0.0, 0.0], [0.0, 0.0], [LN3, 0.0]], dtype=torch.float64)
    adv = torch.zeros(3, 2, dtype=torch.float64)
    anti = torch.tensor([[LN3, 0.0], [0.0, 0.0], [0.0, LN3]], dtype=torch.float64)
    a = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    u = torch.tensor([2.0, 1.0], dtype=torch.float64)  # u_y = (2, 1, 2)
    v = torch.tensor([1.0, 3.0], dtype=torch.float64)  # v_y = (1, 3, 1)
    terms = weighted_objective(y, nat, a=a, u=u, adv_logits=adv, v=v, lam=1.5, anti_logits=anti, b=b)
    natural = (1 * 2 * LN2 + 0 + 0.5 * 2 * math.log(4 / 3)) / 5
    kl_row3 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    boundary = 0.5 * 1 * kl_row3 / 5
    anti_term = (0 + LN2 + 0.5 * math.log(4)) / 3
    assert terms.natural.item() == pytest.approx(natural, rel=1e-12)
    assert terms.boundary.item() == pytest.approx(boundary, rel=1e-12)
    assert terms.anti.item() == pytest.approx(anti_term, rel=1e-12)
    assert terms.total.item() == pytest.approx(natural + 1.5 * boundary + anti_term, rel=1e-12)
    torch.testing.assert_close(terms.per_sample_ce, torch.tensor([LN2, LN2, math.log(4 / 3)], dtype=torch.float64))


def test_kl_all_objective_weights_the_kl_term_by_one():
    """The same rows as above; with a_boundary = 1 every row's KL counts (only row 3 has a
    non-zero KL here, and now with weight 1 instead of a_3 = 0.5), the other terms unchanged."""
    y = torch.tensor([0, 1, 0])
    nat = torch.tensor([[0.0, 0.0], [0.0, 0.0], [LN3, 0.0]], dtype=torch.float64)
    adv = torch.zeros(3, 2, dtype=torch.float64)
    anti = torch.tensor([[LN3, 0.0], [0.0, 0.0], [0.0, LN3]], dtype=torch.float64)
    a = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    b = 1 - a
    v = torch.tensor([1.0, 3.0], dtype=torch.float64)
    paper = weighted_objective(y, nat, a=a, adv_logits=adv, v=v, lam=1.5, anti_logits=anti, b=b)
    kl_all = weighted_objective(y, nat, a=a, adv_logits=adv, v=v, lam=1.5, anti_logits=anti, b=b, a_boundary=1.0)
    kl_row3 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_all.boundary.item() == pytest.approx(1 * 1 * kl_row3 / 5, rel=1e-12)
    assert kl_all.boundary.item() == pytest.approx(2 * paper.boundary.item(), rel=1e-12)
    assert kl_all.natural.item() == paper.natural.item() and kl_all.anti.item() == paper.anti.item()


def test_baselines_are_special_cases():
    torch.manual_seed(0)
    y = torch.randint(0, 4, (6,))
    nat, adv = torch.randn(6, 4), torch.randn(6, 4)
    erm = weighted_objective(y, nat)
    assert torch.allclose(erm.total, torch.nn.functional.cross_entropy(nat, y))
    trades = weighted_objective(y, nat, adv_logits=adv, lam=6.0)
    kl = torch.nn.functional.kl_div(torch.log_softmax(adv, 1), torch.softmax(nat, 1), reduction="batchmean")
    assert torch.allclose(trades.total, torch.nn.functional.cross_entropy(nat, y) + 6 * kl, atol=1e-6)
    # class weights that are all equal change nothing (the objective normalises by their sum)
    same = weighted_objective(y, nat, u=torch.full((4,), 0.25), adv_logits=adv, v=torch.full((4,), 0.25), lam=6.0)
    assert torch.allclose(same.total, trades.total, atol=1e-6)


def test_features_against_hand_values():
    y = torch.tensor([0, 1])
    logits = torch.tensor([[LN3, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # p = (3/5, 1/5, 1/5), uniform
    class_loss = torch.tensor([5.0, 0.7, 2.0], dtype=torch.float64)
    share = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    f = sample_features(logits, y, class_loss, share)
    p1 = [0.6, 0.2, 0.2]
    expected = torch.tensor([
        [-math.log(0.6), 5.0, math.sqrt(0.4**2 + 0.2**2 + 0.2**2), 0.6 - 0.2, sum(p * math.log(p) for p in p1), 0.5],
        [math.log(3), 0.7, math.sqrt((2 / 3) ** 2 + 2 * (1 / 3) ** 2), 0.0, -math.log(3), 0.3],
    ], dtype=torch.float64)
    torch.testing.assert_close(f, expected)
    assert not f.requires_grad


def test_terms_of_chosen_rows_equal_the_hand_values_with_the_others_left_out():
    """adv_index / anti_index (min_row_weight): the KL and anti terms of the given rows only, the
    normalisers still the whole batch's: the hand values of the three-row case above without
    row 3's KL (adv rows 0, 1) and without row 1's anti CE (anti rows 0, 2)."""
    y = torch.tensor([0, 1, 0])
    nat = torch.tensor([[0.0, 0.0], [0.0, 0.0], [LN3, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[0.0, 0.0], [LN3, 0.0]], dtype=torch.float64)  # rows 0 and 1's adversarial logits
    anti = torch.tensor([[LN3, 0.0], [0.0, LN3]], dtype=torch.float64)  # rows 0 and 2's anti logits
    a = torch.tensor([1.0, 0.25, 0.5], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    v = torch.tensor([1.0, 3.0], dtype=torch.float64)  # v_y = (1, 3, 1)
    terms = weighted_objective(y, nat, a=a, adv_logits=adv, v=v, lam=2.0, anti_logits=anti, b=b,
                               adv_index=torch.tensor([0, 1]), anti_index=torch.tensor([0, 2]))
    kl_row1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # p = (1/2, 1/2), q = (3/4, 1/4)
    assert terms.boundary.item() == pytest.approx(0.25 * 3 * kl_row1 / 5, rel=1e-12)
    assert terms.anti.item() == pytest.approx((0 + 0.5 * math.log(4)) / 3, rel=1e-12)
    natural = (LN2 + 0.25 * LN2 + 0.5 * math.log(4 / 3)) / 3
    assert terms.total.item() == pytest.approx(natural + 2.0 * terms.boundary.item() + terms.anti.item(), rel=1e-12)
    # a number for a or b stands for every row
    terms = weighted_objective(y, nat, a=1.0, adv_logits=adv, lam=1.0, anti_logits=anti, b=0.5,
                               adv_index=torch.tensor([0, 1]), anti_index=torch.tensor([0, 2]))
    assert terms.boundary.item() == pytest.approx(kl_row1 / 3, rel=1e-12)
    assert terms.anti.item() == pytest.approx(0.5 * (math.log(4 / 3) + math.log(4)) / 3, rel=1e-12)
