import pytest
import torch

from spo.evaluation.paired_comparison import paired_win_rate, wilson_interval


def test_win_rate_counts_ties_as_half():
    wr = paired_win_rate(torch.tensor([2.0, 1.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 4.0, -1.0]))
    assert wr.rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert wr.low < wr.rate < wr.high and wr.n == 4


def test_wilson_interval_known_value():
    # 8 of 10 at 95%: Wilson interval (0.4902, 0.9433)
    low, high = wilson_interval(8, 10, 0.95)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        paired_win_rate(torch.zeros(3), torch.zeros(4))
