import h5py
import numpy as np
import pytest
import torch

from tracer.errors import TracerError
from tracer.inputs.packing import Layout
from tracer.store.files import partials_of
from tracer.store.trace_file import SCHEMA_VERSION, TraceWriter, open_trace


def _write(path, tensors, **kwargs):
    layout = Layout.from_lengths([3, 4], [1, 0])
    with TraceWriter(path, **kwargs) as w:
        w.set_json("meta", {"dtype": "bfloat16"})
        w.write_sequences(["a", "b"], ["M", "MK"], [1, 2], layout)
        for (p, n), t in tensors.items():
            w.write_tap(p, n, t)
        w.commit()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
def test_round_trip_is_bit_exact(tmp_path, dtype, compression):
    torch.manual_seed(0)
    t = (torch.randn(7, 4, 8) * 100).to(dtype)
    t[0, 0, 0] = float("nan")
    t[0, 0, 1] = float("-inf")
    t[1, 0, 0] = -0.0
    _write(tmp_path / "t.h5", {("packed", "layers.0.q_rope"): t}, compression=compression)
    with open_trace(tmp_path / "t.h5") as tr:
        back = tr.tap("packed", "layers.0.q_rope")
        assert back.dtype == dtype
        assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))  # bits, NaN and -0.0 included
        rows = tr.tap("packed", "layers.0.q_rope", rows=tr.token_slice("b"))
        assert torch.equal(rows.view(torch.uint8), t[3:7].view(torch.uint8))
        assert tr.layout.order == (1, 0) and tr.sequences[1].rows == slice(3, 7)


def test_bf16_decodes_without_torch(tmp_path):
    t = torch.tensor([[1.5, -2.0, 3.0e38, 1e-30]] * 7, dtype=torch.bfloat16)  # 7 token rows
    _write(tmp_path / "t.h5", {("unpacked", "embed"): t})
    with h5py.File(tmp_path / "t.h5") as f:
        ds = f["taps/unpacked/embed"]
        assert ds.dtype == np.uint16 and ds.attrs["encoding"] == "bfloat16-bits-as-uint16"
        decoded = (ds[()].astype(np.uint32) << 16).view(np.float32)  # the README recipe
    assert np.array_equal(decoded, t.float().numpy())
    with open_trace(tmp_path / "t.h5") as tr:
        assert np.array_equal(tr.tap("unpacked", "embed", as_numpy=True), t.float().numpy())


def test_nothing_at_final_path_until_commit(tmp_path):
    path = tmp_path / "t.h5"
    w = TraceWriter(path)
    w.write_tap("packed", "embed", torch.zeros(2, 2))
    assert not path.exists() and partials_of(path) == [w.partial]
    w.abort()
    assert not path.exists() and not partials_of(path)


def test_exception_inside_writer_removes_partial(tmp_path):
    path = tmp_path / "t.h5"
    with pytest.raises(KeyboardInterrupt):
        with TraceWriter(path) as w:
            w.write_tap("packed", "embed", torch.zeros(2, 2))
            raise KeyboardInterrupt
    assert not path.exists() and not partials_of(path)


def test_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "t.h5"
    path.write_bytes(b"precious")
    with pytest.raises(TracerError, match="exists; pass --force"):
        TraceWriter(path)
    assert path.read_bytes() == b"precious"
    for value in (7.0, -2.0):  # replaces the foreign file, then a trace of its own
        _write(path, {("packed", "embed"): torch.full((7, 1), value)}, force=True)  # 3 + 4 token rows
        with open_trace(path) as t:
            assert torch.equal(t.tap("packed", "embed"), torch.full((7, 1), value))
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]  # replaced in place, no partial left


def test_schema_version_recorded(tmp_path):
    _write(tmp_path / "t.h5", {})
    with h5py.File(tmp_path / "t.h5") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION and f.attrs["complete"]


def test_missing_tap_lists_what_exists(tmp_path):
    _write(tmp_path / "t.h5", {("packed", "embed"): torch.zeros(7, 2)})
    with open_trace(tmp_path / "t.h5") as tr:
        with pytest.raises(TracerError, match="no tap 'layers.0.ctx' for path 'packed'; it has 1 taps \\(embed\\)"):
            tr.tap("packed", "layers.0.ctx")
        with pytest.raises(TracerError, match="no tensors for path 'reference'; it has: packed"):
            tr.taps("reference")
