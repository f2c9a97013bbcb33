import pytest

from tracer.errors import TracerError
from tracer.taps import parse_tap, select_taps, tap_names, walk_key


def test_tap_names_are_pinned():
    assert tap_names(2) == [
        "embed",
        "layers.0.q_rope", "layers.0.k_rope", "layers.0.v", "layers.0.ctx",
        "layers.0.attn_out", "layers.0.resid_mid", "layers.0.ffn_out", "layers.0.resid_out",
        "layers.1.q_rope", "layers.1.k_rope", "layers.1.v", "layers.1.ctx",
        "layers.1.attn_out", "layers.1.resid_mid", "layers.1.ffn_out", "layers.1.resid_out",
        "final_norm",
    ]


def test_parse_and_walk_order():
    assert parse_tap("layers.12.ctx") == (12, "ctx")
    assert parse_tap("embed") == (None, "embed")
    names = tap_names(3)
    assert sorted(reversed(names), key=walk_key) == names


@pytest.mark.parametrize("bad", ["layers.x.ctx", "layers.0.nope", "blocks.0.ctx", "ctx"])
def test_bad_tap_names(bad):
    with pytest.raises(TracerError, match="not a tap name"):
        parse_tap(bad)


def test_select_subsets():
    assert select_taps(4, ["ctx", "embed"], [1, 3]) == ["embed", "layers.1.ctx", "layers.3.ctx"]
    with pytest.raises(TracerError, match="unknown tap 'qq'"):
        select_taps(4, ["qq"], None)
    with pytest.raises(TracerError, match="layer 7 does not exist; this model has layers 0..3"):
        select_taps(4, None, [7])
