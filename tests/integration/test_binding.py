"""A trace is bound to its run (issue 17, items 9-12): every checksum covers the run id, the
dataset's name and its bytes; a manifest lists what the run wrote. Deleted, extra, renamed,
swapped or transplanted datasets and summaries are one-line refusals in every reader."""

import json
import shutil

import h5py

from tests.conftest import one_line_error
from tracer import bundle as bundle_cli
from tracer import compare
from tracer import plot as plot_cli
from tracer.store.binding import seed
from tracer.store.trace_file import checksum, open_trace


def _copy(src, tmp_path, name="x.h5"):
    dest = tmp_path / name
    shutil.copy(src, dest)
    return dest


def _transplant(dest, src, groups):
    with h5py.File(dest, "r+") as f, h5py.File(src) as g:
        for group in groups:
            del f[group]
            g.copy(g[group], f, name=group)


def _every_reader_refuses(capsys, tmp_path, path, fragment):
    for argv in ([str(path)], [str(path), "--verify"], [str(path), "--stored"], [str(path), "--json"]):
        one_line_error(capsys, compare.main, argv, fragment)
    one_line_error(capsys, plot_cli.main, [str(path), "-o", str(tmp_path / "plots")], fragment)
    one_line_error(capsys, bundle_cli.main, [str(path), "-o", str(tmp_path / "bundle")], fragment)
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "bundle.zip").exists()


def test_item9_deleting_the_reference_taps_is_refused_not_rejudged_by_the_plain_rule(seed_pair, tmp_path, capsys):
    x = _copy(seed_pair[0], tmp_path)
    with h5py.File(x, "r+") as f:
        del f["taps/reference"]
    _every_reader_refuses(capsys, tmp_path, x, "is missing tap embed of path reference")


def test_item9_an_extra_dataset_is_refused(seed_pair, tmp_path, capsys):
    x = _copy(seed_pair[0], tmp_path)
    with h5py.File(x, "r+") as f:
        f["taps/packed/layers.9.ctx"] = f["taps/packed/layers.0.ctx"][()]
    _every_reader_refuses(capsys, tmp_path, x, "holds /taps/packed/layers.9.ctx, which its run did not write")


def test_item10_data_of_another_run_fails_the_checksums(seed_pair, tmp_path, capsys):
    x = _copy(seed_pair[0], tmp_path)
    _transplant(x, seed_pair[1], ["taps", "metrics", "embeddings"])
    one_line_error(capsys, compare.main, [str(x), "--verify"], "fails its checksum")
    one_line_error(capsys, compare.main, [str(x)], "fails its checksum")
    y = _copy(seed_pair[0], tmp_path, "emb.h5")  # the embeddings alone: compare reads them too
    _transplant(y, seed_pair[1], ["embeddings"])
    line = one_line_error(capsys, compare.main, [str(y)], "fails its checksum")
    assert "/embeddings/" in line, line  # whichever side's embeddings are read first


def test_item10_a_stored_summary_that_the_data_do_not_give_is_refused(seed_pair, tmp_path, capsys):
    x = _copy(seed_pair[0], tmp_path)
    with h5py.File(seed_pair[1]) as g:
        other = g.attrs["summary"]
    with h5py.File(x, "r+") as f:
        f.attrs["summary"] = other  # seed 1's verdict, with seed 1's checksum: foreign
        f.attrs["summary_crc32"] = h5py.File(seed_pair[1]).attrs["summary_crc32"]
    one_line_error(capsys, compare.main, [str(x)], "its summary record fails its checksum")
    with h5py.File(x, "r+") as f:  # re-bound to this run (as only a forger would): the data still disagree
        f.attrs["summary_crc32"] = checksum(other, seed(f.attrs["run_id"], "summary"))
    with open_trace(seed_pair[0]) as a, open_trace(seed_pair[1]) as b:
        mine, theirs = a.summary["first_divergence"]["token"], b.summary["first_divergence"]["token"]
    assert mine != theirs
    err = one_line_error(capsys, compare.main, [str(x), "--stored"], "its stored summary says")
    assert f"token {theirs}, but its stored metrics give" in err and f"token {mine}" in err
    for main, extra in ((plot_cli.main, ["-o", str(tmp_path / "p")]), (bundle_cli.main, ["-o", str(tmp_path / "b")])):
        one_line_error(capsys, main, [str(x), *extra], "its stored summary says")


def test_item11_a_metrics_group_of_another_trace_is_refused_by_stored_plot_and_bundle(seed_pair, tmp_path, capsys):
    x = _copy(seed_pair[0], tmp_path)
    _transplant(x, seed_pair[1], ["metrics"])
    _every_reader_refuses(capsys, tmp_path, x, "fails its checksum")


def test_item12_renamed_taps_are_refused_by_bundle_and_plot(seed_pair, tmp_path, capsys):
    x = _copy(seed_pair[0], tmp_path)
    with h5py.File(x, "r+") as f:
        f.move("taps/packed/layers.0.v", "tmp")
        f.move("taps/packed/layers.0.ctx", "taps/packed/layers.0.v")
        f.move("tmp", "taps/packed/layers.0.ctx")
    for main, extra in ((compare.main, []), (plot_cli.main, ["-o", str(tmp_path / "p")]), (bundle_cli.main, ["-o", str(tmp_path / "b")])):
        one_line_error(capsys, main, [str(x), *extra], "fails its checksum")
    assert not (tmp_path / "b").exists() and not (tmp_path / "p").exists()


def test_the_slim_trace_is_bound_to_its_own_run(seed_pair, tmp_path, capsys):
    folder, _ = bundle_cli.make_bundle(seed_pair[0], tmp_path / "b")
    slim = folder / bundle_cli.SLIM
    with open_trace(seed_pair[0]) as src, open_trace(slim) as t:
        assert t.run_id != src.run_id and t.meta["slim"]["source_run_id"] == src.run_id
        assert t.verify() > 0 and t.summary["first_divergence"] == src.summary["first_divergence"]
    assert compare.main([str(slim)]) == 0
    capsys.readouterr()
    x = _copy(slim, tmp_path)  # the source's metrics put back into the slim trace: foreign there
    _transplant(x, seed_pair[0], ["metrics"])
    one_line_error(capsys, compare.main, [str(x)], "fails its checksum")


def test_older_schemas_are_refused_with_one_line_naming_the_schema(seed_pair, tmp_path, capsys):
    x = _copy(seed_pair[0], tmp_path)
    with h5py.File(x, "r+") as f:
        f.attrs["schema_version"] = 2
    one_line_error(capsys, compare.main, [str(x)], "is a trace of schema 2, whose checksums are not bound to its run")


def test_meta_of_another_run_is_refused(seed_pair, tmp_path, capsys):
    x = _copy(seed_pair[0], tmp_path)
    with h5py.File(x, "r+") as f, h5py.File(seed_pair[1]) as g:
        f.attrs["meta"], f.attrs["meta_crc32"] = g.attrs["meta"], g.attrs["meta_crc32"]
    one_line_error(capsys, compare.main, [str(x)], "its meta record fails its checksum")
    with h5py.File(x, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        f.attrs["meta_crc32"] = checksum(f.attrs["meta"], seed(f.attrs["run_id"], "meta"))
    assert meta["run_id"] != open_trace(seed_pair[0]).run_id
    one_line_error(capsys, compare.main, [str(x)], "its meta record belongs to another run")
