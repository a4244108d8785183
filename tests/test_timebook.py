"""The miner's time book: main-loop activities partition the wall time, background work is booked
apart, and the ratios the GPU benchmark prints come out of it."""
import pytest

from neurons.timebook import TimeBook, hop_wall_ratio
from scripts.gpu_subnet_metrics import BREAKDOWN_COLUMNS, seal_seconds, time_breakdown


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_main_activities_and_other_sum_to_the_wall_time_and_background_is_apart():
    clock = Clock()
    book = TimeBook(clock)
    with book.timed("compute"):
        clock.t += 3.0
    with book.timed("lease"):
        clock.t += 0.5
    book.add("barrier", 1.5)
    clock.t += 1.5
    clock.t += 1.0  # nobody booked this second: loop overhead
    book.add("upload", 2.0)  # a background thread, overlapping the compute above
    s = book.summary()
    assert s["wall"] == pytest.approx(6.0)
    assert s["main"]["compute"] == 3.0 and s["main"]["lease"] == 0.5 and s["main"]["other"] == pytest.approx(1.0)
    assert sum(s["main"].values()) == pytest.approx(s["wall"])
    assert s["background"]["upload"] == 2.0 and s["counts"]["compute"] == 1
    with pytest.raises(KeyError):
        book.add("napping", 1.0)


def test_hop_wall_ratio_counts_in_round_waits_but_not_merges_or_setup():
    main = {"compute": 10.0, "lease": 1.0, "download": 0.5, "drain": 0.5, "barrier": 2.0, "step": 1.0,
            "wait_work": 1.0, "merge": 30.0, "setup": 20.0}
    assert hop_wall_ratio(main) == pytest.approx(1.6)
    assert hop_wall_ratio({"compute": 0.0, "lease": 1.0}) is None


def test_breakdown_row_and_bridge_seal_seconds_from_prometheus_text():
    text = ('# HELP resbm_bridge_seal_seconds x\nresbm_bridge_seal_seconds_bucket{le="0.001",stage="0"} 1.0\n'
            'resbm_bridge_seal_seconds_count{stage="0"} 4.0\nresbm_bridge_seal_seconds_sum{stage="0"} 0.25\n'
            'resbm_bridge_seal_seconds_count{stage="1"} 2.0\nresbm_bridge_seal_seconds_sum{stage="1"} 0.5\n')
    assert seal_seconds(text) == {0: (0.25, 4), 1: (0.5, 2)}
    status = {"hops_computed": 8, "time": {"wall": 20.0, "main": {"compute": 8.0, "lease": 1.0, "download": 1.0,
                                                                  "drain": 2.0, "merge": 5.0, "other": 3.0},
                                           "background": {"upload": 4.0}}}
    row = time_breakdown(status, (0.25, 4))
    assert set(BREAKDOWN_COLUMNS) <= set(row) and row["hops"] == 8 and row["seal"] == 0.25
    assert row["hop_wall_ratio"] == pytest.approx(12.0 / 8.0) and row["own_path_ratio"] == pytest.approx(1.5)
    assert time_breakdown({})["hop_wall_ratio"] is None
