"""The hang detector alone, on a manual clock."""

from vllm_guard.core.hang import HangDetector


def test_an_unanswered_health_probe_for_the_threshold_is_a_hang():
    d = HangDetector(after_s=5, now=0)
    d.health(True, 1)
    assert d.hung(5.9) is None
    d.health(False, 6)
    assert "health probe" in d.hung(6.0)
    assert d.hung_since == 6.0
    d.health(True, 7)
    assert d.hung(7) is None and d.hung_since is None  # resumed: not hung any more


def test_requests_without_tokens_is_a_hang_but_idleness_is_not():
    d = HangDetector(after_s=5, now=0)
    for t in range(0, 20):
        d.health(True, t)
        d.progress(100, busy=False, now=t)  # idle: frozen counters are fine
        assert d.hung(t) is None
    d.progress(100, busy=True, now=20)  # requests arrive
    d.progress(150, busy=True, now=22)  # tokens move
    for t in (23, 26):
        d.health(True, t)
        d.progress(150, busy=True, now=t)
    assert d.hung(26.9) is None
    d.health(True, 27)
    d.progress(150, busy=True, now=27)
    assert "no token" in d.hung(27)  # 5 s since the last token with requests in it
    d.progress(151, busy=True, now=28)
    assert d.hung(28) is None


def test_unknown_token_counts_keep_the_last_known_value():
    d = HangDetector(after_s=5, now=0)
    d.progress(10, busy=True, now=0)
    d.progress(None, busy=True, now=3)  # a reading without counters does not reset it
    d.health(True, 6)
    assert "no token" in d.hung(6)
    d.reset(6)
    assert d.hung(6) is None
