"""Progressive-resizing arithmetic: schedules are data, so their sums are checked here."""

import pytest

from tune_sota.schedule import epochs_per_stage, parse_schedule, size_at_epoch


def test_parse_equal_and_weighted_shares():
    assert parse_schedule("64>96>128") == [(64, 1 / 3), (96, 1 / 3), (128, 1 / 3)]
    assert parse_schedule("64:2>128:1") == [(64, 2 / 3), (128, 1 / 3)]
    assert parse_schedule(" 128 ") == [(128, 1.0)]


@pytest.mark.parametrize("bad", ["", "64>abc", "128>64", "64>64", "64:0>128", "4>128", "64:x>128"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse_schedule(bad)


@pytest.mark.parametrize("schedule,epochs,expected", [
    ("64>96>128", 3, [1, 1, 1]),
    ("64>96>128", 5, [1, 2, 2]),      # remainders go to the later (larger) stages
    ("64>96>128", 9, [3, 3, 3]),
    ("64:2>128:1", 6, [4, 2]),
    ("64:9>128:1", 4, [3, 1]),        # the final size keeps at least one epoch
    ("64>96>128", 2, [0, 1, 1]),      # too few epochs: the earliest stages go
    ("64>96>128", 1, [0, 0, 1]),
    ("128", 7, [7]),
])
def test_epochs_per_stage(schedule, epochs, expected):
    counts = epochs_per_stage(parse_schedule(schedule), epochs)
    assert counts == expected and sum(counts) == epochs


@pytest.mark.parametrize("epochs", range(1, 25))
def test_every_run_ends_at_the_final_size(epochs):
    stages = parse_schedule("32:3>48:2>64:1")
    sizes = [size_at_epoch(stages, epochs, e) for e in range(epochs)]
    assert sizes[-1] == 64 and sizes == sorted(sizes)


def test_size_at_epoch():
    stages = parse_schedule("64>128")
    assert [size_at_epoch(stages, 4, e) for e in range(4)] == [64, 64, 128, 128]
