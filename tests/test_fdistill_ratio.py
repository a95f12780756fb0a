"""f-distill's ratio normaliser on its own: per-noise-level-bin means by hand, global SUM reduction, EMA, state."""
import pytest
import torch

from fdistill.methods.fdistill.ratio import RatioNormaliser, mean_one_weights

# two micro-batches on this process; bins of 4: quantile u -> bin floor(4 u). Bin 2 is empty here.
RATIOS = [torch.tensor([1.0, 3.0, 0.5]), torch.tensor([2.0, 6.0])]
QUANTILES = [torch.tensor([0.10, 0.20, 0.80]), torch.tensor([0.15, 0.95])]
# bin 0: {1, 3, 2} (u 0.10, 0.20, 0.15), bin 3: {0.5, 6} (u 0.80, 0.95); bins 1 and 2 get no sample
BY_HAND = {0: (1.0 + 3.0 + 2.0) / 3, 3: (0.5 + 6.0) / 2}


def one_process(tensor):
    return tensor


def test_each_ratio_is_divided_by_the_mean_of_its_bin_and_empty_bins_keep_their_value():
    normaliser = RatioNormaliser(num_bins=4)
    out = normaliser(RATIOS, QUANTILES, one_process)
    expected = [torch.tensor([1.0 / BY_HAND[0], 3.0 / BY_HAND[0], 0.5 / BY_HAND[3]]),
                torch.tensor([2.0 / BY_HAND[0], 6.0 / BY_HAND[3]])]
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(normaliser.bin_means, torch.tensor([BY_HAND[0], 1.0, 1.0, BY_HAND[3]]))
    assert normaliser.bins_seen.tolist() == [True, False, False, True]


def test_bin_means_are_global_sums_over_global_counts():
    """Another process holds the samples 10 (bin 0) and 4, 8 (bin 2, empty here): bin 0's mean is (1+3+2+10) / 4,
    not the mean of the two processes' means, and bin 2 gets the other process's exact mean."""
    other = torch.zeros(2, 4, dtype=torch.float64)
    other[0, 0], other[1, 0] = 10.0, 1.0
    other[0, 2], other[1, 2] = 12.0, 2.0
    calls = []

    def two_processes(tensor):
        calls.append(tensor.shape)
        return tensor + other

    normaliser = RatioNormaliser(num_bins=4)
    out = normaliser(RATIOS, QUANTILES, two_processes)
    assert calls == [(2, 4)]                                     # one collective: [sums, counts]
    torch.testing.assert_close(normaliser.bin_means, torch.tensor([16.0 / 4, 1.0, 6.0, BY_HAND[3]]))
    torch.testing.assert_close(out[1], torch.tensor([2.0 / 4.0, 6.0 / BY_HAND[3]]))


def test_ema_blends_only_bins_seen_before():
    normaliser = RatioNormaliser(num_bins=4, ema=0.75)
    normaliser(RATIOS, QUANTILES, one_process)                   # step 1: bins 0 and 3 (nothing stored: no blend)
    torch.testing.assert_close(normaliser.bin_means, torch.tensor([BY_HAND[0], 1.0, 1.0, BY_HAND[3]]))
    # step 2: bin 0 sees 8 (blended with step 1), bin 1 sees 5 for the first time (not blended with the initial 1)
    out = normaliser([torch.tensor([8.0, 5.0])], [torch.tensor([0.0, 0.4])], one_process)
    blended = 0.75 * BY_HAND[0] + 0.25 * 8.0
    torch.testing.assert_close(normaliser.bin_means, torch.tensor([blended, 5.0, 1.0, BY_HAND[3]]))
    torch.testing.assert_close(out[0], torch.tensor([8.0 / blended, 1.0]))
    assert normaliser.bins_seen.tolist() == [True, True, False, True]


def test_evaluation_does_not_update_and_state_dict_round_trips():
    normaliser = RatioNormaliser(num_bins=4, ema=0.5)
    normaliser(RATIOS, QUANTILES, one_process, update=False)
    assert torch.equal(normaliser.bin_means, torch.ones(4)) and not normaliser.bins_seen.any()
    normaliser(RATIOS, QUANTILES, one_process)
    state = normaliser.state_dict()
    assert set(state) == {"bin_means", "bins_seen"}
    restored = RatioNormaliser(num_bins=4, ema=0.5)
    restored.load_state_dict(state)
    assert torch.equal(restored.bin_means, normaliser.bin_means)
    assert torch.equal(restored.bins_seen, normaliser.bins_seen)
    step = ([torch.tensor([4.0, 0.2])], [torch.tensor([0.05, 0.6])])
    for got, want in zip(restored(*step, one_process), normaliser(*step, one_process)):
        assert torch.equal(got, want)


def test_no_bins_is_the_identity_without_a_collective():
    def must_not_reduce(tensor):
        raise AssertionError("no statistics to reduce")

    out = RatioNormaliser(num_bins=0)(RATIOS, QUANTILES, must_not_reduce)
    assert all(torch.equal(a, b) for a, b in zip(out, RATIOS))


def test_weights_are_divided_by_their_global_mean():
    weights = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    other = torch.tensor([10.0, 2.0], dtype=torch.float64)       # another process: two weights summing to 10
    normalised, mean = mean_one_weights(weights, lambda t: t + other)
    assert float(mean) == pytest.approx(16.0 / 5)
    torch.testing.assert_close(torch.cat(normalised), torch.tensor([1.0, 2.0, 3.0]) * 5 / 16)
