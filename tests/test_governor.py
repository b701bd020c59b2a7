"""The adaptive-speculation governor, on synthetic timings (it is pure: timings in, decisions out)."""
import pytest

from gsd_serve.core.governor import SpeculationGovernor


def decisions(g: SpeculationGovernor, n: int, step_s: float = 0.1) -> list[bool]:
    out = []
    for _ in range(n):
        spec = g.speculate()
        out.append(spec)
        if not spec:
            g.record_step(step_s)
    return out


def test_measures_a_plain_step_before_speculating():
    g = SpeculationGovernor()
    assert not g.speculate()
    g.record_step(0.1)
    assert g.speculate() and g.plain_steps == 1


def test_speculation_that_pays_continues():
    g = SpeculationGovernor(step_seconds=0.1)
    for _ in range(20):
        assert g.speculate()
        g.record_round(3, 0.12)          # 25 tok/s against 10 tok/s plain
    assert g.plain_steps == 0


def test_a_losing_sequence_backs_off_exponentially_and_probes_again():
    g = SpeculationGovernor(step_seconds=0.1, min_rounds=1, min_backoff=2, max_backoff=8, alpha=1.0)
    g.record_round(1, 0.13)              # 7.7 tok/s < 10 tok/s: back off 2 steps
    assert decisions(g, 3) == [False, False, True]
    g.record_round(1, 0.13)              # still losing: 4 steps
    assert decisions(g, 5) == [False] * 4 + [True]
    g.record_round(1, 0.13)              # 8, then capped at 8
    assert decisions(g, 9) == [False] * 8 + [True]
    g.record_round(1, 0.13)
    assert decisions(g, 9) == [False] * 8 + [True]
    g.record_round(2, 0.13)              # a win resets the back-off
    assert g.speculate()
    g.record_round(1, 0.13)
    assert decisions(g, 3) == [False, False, True]


def test_rates_are_moving_averages():
    g = SpeculationGovernor(step_seconds=0.1, alpha=0.5, min_rounds=1)
    g.record_round(4, 0.2)               # 20 tok/s
    g.record_round(1, 0.2)               # 5 tok/s: average 12.5 > 10, no back-off
    assert g.speculate() and g.round_rate == pytest.approx(12.5)
    g.record_round(1, 0.2)               # average 8.75 < 10
    assert not g.speculate()


def test_no_judgement_before_min_rounds():
    g = SpeculationGovernor(step_seconds=0.1, min_rounds=3)
    g.record_round(1, 0.2)
    g.record_round(1, 0.2)
    assert g.speculate()
    g.record_round(1, 0.2)
    assert not g.speculate()


@pytest.mark.parametrize("kwargs", [dict(min_rounds=0), dict(min_backoff=0), dict(min_backoff=8, max_backoff=4), dict(alpha=0.0),
                                    dict(margin=0.0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SpeculationGovernor(**kwargs)


def test_one_unlucky_round_does_not_stop_speculation_that_pays_on_average():
    g = SpeculationGovernor(step_seconds=0.1)
    for _ in range(5):
        g.record_round(3, 0.12)
    g.record_round(1, 0.12)              # alone 8.3 tok/s, below plain decoding's 10
    assert g.speculate()
    for _ in range(10):                  # but a sustained loss backs off
        g.record_round(1, 0.15)
    assert not g.speculate()
