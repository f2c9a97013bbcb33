"""A plug-in's source digest (issue 17, item 14): what a campaign resume compares."""

import sys

from tracer.capture.provenance import plugin_sources, source_digest
from tracer.runner.execute import RunConfig


def test_file_spec_digest_follows_the_file_bytes(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("def make(model, alphabet):\n    return model\n")
    before = source_digest(f"{f}:make")
    assert before["file"] == str(f.resolve()) and len(before["sha256"]) == 64
    f.write_text(f.read_text() + "# one comment\n")
    assert source_digest(f"{f}:make")["sha256"] != before["sha256"]


def test_module_spec_digest_is_of_the_module_file(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg_prov"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fwd.py").write_text("def make(model, alphabet):\n    return model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = source_digest("mypkg_prov.fwd:make")
    assert before["file"] == str((pkg / "fwd.py").resolve())
    (pkg / "fwd.py").write_text("def make(model, alphabet):\n    return model  # changed\n")
    assert source_digest("mypkg_prov.fwd:make")["sha256"] != before["sha256"]
    sys.modules.pop("mypkg_prov", None)


def test_builtin_sides_have_no_source_and_callables_have_their_file():
    assert plugin_sources(RunConfig()) == {} == plugin_sources(RunConfig(packed="hf", unpacked="hf"))
    digest = plugin_sources(RunConfig(packed=test_builtin_sides_have_no_source_and_callables_have_their_file))["packed"]
    assert digest["file"] == __file__ and digest["spec"].startswith("callable ")
