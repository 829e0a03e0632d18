"""The stage schedule: doubling capacities, round splits, and errors that name the bad value."""

import pytest

from devft.growth import StageSchedule, doubling_capacities, make_schedule, split_rounds


@pytest.mark.parametrize(
    ("layers", "stages", "expected"),
    [(30, 4, (4, 8, 15, 30)), (32, 4, (4, 8, 16, 32)), (8, 3, (2, 4, 8)), (8, 1, (8,)), (5, 2, (3, 5))],
)
def test_doubling_capacities_match_the_formula(layers, stages, expected):
    assert doubling_capacities(layers, stages) == expected


def test_doubling_refuses_too_many_stages_naming_them():
    with pytest.raises(ValueError, match="num_stages=5"):
        doubling_capacities(8, 5)  # ceil(8/16) = ceil(8/8) = 1


def test_equal_split_gives_the_remainder_to_the_last_stages():
    assert split_rounds(12, 4) == (3, 3, 3, 3)
    assert split_rounds(10, 4) == (2, 2, 3, 3)
    with pytest.raises(ValueError, match="total_rounds=3"):
        split_rounds(3, 4)


def test_make_schedule_doubling_and_explicit():
    s = make_schedule(30, total_rounds=20)
    assert s.capacities == (4, 8, 15, 30) and s.rounds == (5, 5, 5, 5)
    e = make_schedule(30, capacities=(10, 30), rounds_per_stage=(3, 1))
    assert e.capacities == (10, 30) and e.total_rounds == 4
    with pytest.raises(ValueError, match="sums to 4"):
        make_schedule(30, total_rounds=5, capacities=(10, 30), rounds_per_stage=(3, 1))


@pytest.mark.parametrize(
    ("capacities", "rounds", "message"),
    [
        ((8, 4, 30), (1, 1, 1), "got 4 after 8"),
        ((4, 4, 30), (1, 1, 1), "got 4 after 4"),
        ((4, 31), (1, 1), "capacity 31 exceeds"),
        ((4, 15), (1, 1), "full depth 30, got 15"),
        ((4, 30), (2, 0), "got 0 in rounds"),
        ((0, 30), (1, 1), "capacity 0"),
        ((4, 30), (1,), "one entry per stage"),
    ],
)
def test_invalid_schedules_raise_naming_the_value(capacities, rounds, message):
    with pytest.raises(ValueError, match=message):
        StageSchedule(num_layers=30, capacities=capacities, rounds=rounds)


def test_rounds_map_to_stages():
    s = StageSchedule(num_layers=30, capacities=(4, 8, 30), rounds=(2, 1, 3))
    assert [s.stage_of_round(r) for r in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert [s.first_round(i) for i in range(3)] == [1, 3, 4]
    assert [r for r in range(1, 7) if s.is_last_round_of_stage(r)] == [2, 3, 6]
    with pytest.raises(ValueError, match="server_round=7"):
        s.stage_of_round(7)
