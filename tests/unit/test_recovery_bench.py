"""The recovery benchmark's arithmetic: a stream's stall around a kill, and the table it prints."""

from bench.recovery import Stream, table


def test_a_streams_stall_is_its_gap_around_the_kill():
    stream = Stream("r", [1, 2, 3, 4], [0.0, 0.1, 0.9, 1.0])
    assert stream.gaps() == [0.1, 0.8, 0.09999999999999998]
    assert abs(stream.stall_around(0.5) - 0.8) < 1e-9
    assert stream.stall_around(2.0) is None  # nothing came after: no stall to measure
    assert stream.stall_around(-1.0) is None


def test_the_table_has_one_row_per_scenario():
    row = {"scenario": "token worker killed", "hit": "4/8", "ways": "resume (kv_store)", "tbt_ms": "60",
           "stall_p50_ms": "300", "stall_max_ms": "400", "stall_in_tbt": "5.0x", "identical": 8, "streams": 8}
    lines = table([row]).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| token worker killed | 4/8 | resume (kv_store) | 60 | 300 |")
    assert lines[2].endswith("| 8/8 |")
