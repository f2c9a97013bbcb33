"""Many traced runs into one output folder: a manifest, progress lines, resume, and the facts
each trace contributes to a summary. Shared by ``tracer.experiments`` and ``tracer.sweep``.

The folder holds ``manifest.json`` (what was planned, and the result row of every finished
run), ``traces/<name>.h5`` (one trace per run, kept) and the summaries. The manifest is
rewritten atomically (temporary file, fsync, rename) after every finished run, so an
interrupted campaign resumes where it stopped: rerun the same command and the finished runs are
skipped. A folder that holds something else is never written into without ``--force``, and even
then only the campaign's own files are (re)written; nothing is deleted.

A resume reuses a finished run only if (:meth:`Campaign.reuse`) its configuration fingerprint
(:func:`fingerprint`: the run's configuration and the digest of every plug-in's source file) is
the one recorded, its trace verifies as ``tracer.compare`` verifies it (checksums, manifest,
stored summary against stored metrics, metrics against tensors), the trace is the one the row
recorded (its run id), and the trace says it ran the plug-in source there is now. Otherwise the
run is done again, with one line saying why. What is reported comes from the verified traces
(:class:`TraceFacts`), never from the manifest's copy of a row.

Example::

    camp = Campaign(Path("exp"), "tracer.experiments", plan={"model": ...}, force=False)
    for name in names:
        facts = camp.reuse(name, fingerprint(config, {"name": name}), say)
        if facts is None:
            trace(..., out=camp.trace_path(name))
            facts = TraceFacts.read(camp.trace_path(name))
            camp.finish(name, row_of(facts), facts, fp)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from tracer.capture.provenance import label, plugin_sources
from tracer.judging.embeddings import pooled_cosines
from tracer.errors import TracerError
from tracer.store import files
from tracer.store.trace_file import open_trace, reading
from tracer.taps import SITES

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
"""2: every finished row records its trace's ``run_id`` and its configuration ``fingerprint``."""
VERDICTS = ("agree", "diverged")


def fingerprint(config, extra: dict) -> dict:
    """What a run's result depends on: ``{"config": digest, "sources": plug-in source digests}``.

    ``config`` is a :class:`tracer.runner.execute.RunConfig` (its output path, ``force`` and
    command line left out); ``extra`` is what else the row depends on (its name, sequences, ...).
    """
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("out", "force", "command")}
    fields["packed"], fields["unpacked"] = label(config.packed), label(config.unpacked)
    text = json.dumps({"config": fields, **extra}, sort_keys=True, default=_plain)
    return {"config": hashlib.sha256(text.encode()).hexdigest()[:16], "sources": plugin_sources(config)}


def _plain(x):
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return x.to_dict() if hasattr(x, "to_dict") else str(x)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`tracer.store.files.write_atomic`)."""
    files.write_atomic(path, text)


def write_json_atomic(path: Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def check_folder(out: Path, tool: str, force: bool) -> None:
    """Refuse (without ``force``) a folder that exists, is not empty and has no manifest of ``tool``."""
    if out.exists() and not out.is_dir():
        raise TracerError(f"{out} is a file; --out takes a folder")
    if out.is_dir() and not (out / MANIFEST).exists() and any(out.iterdir()) and not force:
        raise TracerError(f"{out} exists and is not a {tool} folder (no {MANIFEST}); choose another --out or pass --force")


class Campaign:
    """One output folder of a multi-run command.

    Args:
        out: the folder.
        tool: the command (``tracer.experiments`` / ``tracer.sweep``), recorded and checked.
        plan: JSON-able description of everything that determines the results (model, weights
            fingerprint, dtype, sequences, the list of runs, ...). A manifest with another plan
            is not resumed: without ``force`` that is an error, with it the campaign starts over.
        force: write into a folder that holds something else.
    """

    def __init__(self, out: Path, tool: str, plan: dict, force: bool = False):
        self.out = Path(out)
        self.tool = tool
        self.plan = json.loads(json.dumps(plan, sort_keys=True))  # normalised (tuples -> lists)
        self.done: dict[str, dict] = {}
        manifest = self.out / MANIFEST
        check_folder(self.out, tool, force)
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError):
                old = None
            if not isinstance(old, dict) or old.get("tool") != tool:
                if not force:
                    what = f"a {old.get('tool')} folder" if isinstance(old, dict) else "an unreadable manifest"
                    raise TracerError(f"{self.out} holds {what}; choose another --out, or pass --force to write {tool} results into it")
            elif old.get("plan") != self.plan:
                if not force:
                    diff = sorted(k for k in set(self.plan) | set(old.get("plan", {})) if self.plan.get(k) != old.get("plan", {}).get(k))
                    raise TracerError(
                        f"{self.out} holds a {tool} run with different settings ({', '.join(diff)}); "
                        "choose another --out, or pass --force to start over in it"
                    )
            else:
                self.done = dict(old.get("done", {}))
        try:
            (self.out / "traces").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TracerError(f"cannot create {self.out}: {e.strerror or e}") from None
        self._save()

    def trace_path(self, name: str) -> Path:
        return self.out / "traces" / f"{name}.h5"

    def is_done(self, name: str) -> bool:
        return name in self.done

    def forget(self, name: str) -> None:
        """Drop a finished row (it will be run again)."""
        if self.done.pop(name, None) is not None:
            self._save()

    def reuse(self, name: str, fp: dict, say) -> "TraceFacts | None":
        """The verified facts of finished run ``name`` if it may be reused, else ``None`` (the
        row is dropped and ``say`` gets one line: ``name: why; rerunning``)."""
        row = self.done.get(name)
        if row is None:
            return None
        facts, why = None, None
        if not isinstance(row, dict) or "fingerprint" not in row:
            why = "its row has no configuration fingerprint"
        elif row["fingerprint"] != fp:
            why = _changed(row["fingerprint"], fp)
        else:
            try:
                facts = TraceFacts.read(self.trace_path(name))
            except TracerError as e:
                why = f"trace fails verification ({e})"
            else:
                if facts.run_id != row.get("run_id"):
                    why = f"its trace is not the one this row recorded (run id {facts.run_id}, recorded {row.get('run_id')})"
                elif facts.plugin_sources != fp["sources"]:
                    why = "its trace ran another version of the plug-in source"
        if why:
            say(f"{name}: {why}; rerunning")
            self.forget(name)
            return None
        return facts

    def finish(self, name: str, row: dict, facts: "TraceFacts | None" = None, fp: dict | None = None) -> None:
        """Record a finished run's result row, with its trace's run id and its configuration
        fingerprint (the manifest is rewritten atomically)."""
        self.done[name] = {**row, "run_id": facts.run_id if facts else None, "fingerprint": fp}
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.out / MANIFEST, {
            "tool": self.tool, "manifest_version": MANIFEST_VERSION, "plan": self.plan, "done": self.done,
        })


def _changed(old, new: dict) -> str:
    """Why a recorded fingerprint differs from the current one, in words."""
    if not isinstance(old, dict):
        return "its recorded configuration fingerprint is unreadable"
    for side, now in new["sources"].items():
        then = (old.get("sources") or {}).get(side)
        if then != now:
            return f"the {side} plug-in source {now.get('file') or now.get('spec')} changed since it ran"
    if old.get("sources") != new["sources"]:
        return "its plug-ins changed since it ran"
    return "its configuration changed since it ran"


@dataclass(frozen=True)
class TraceFacts:
    """What one trace contributes to a campaign's summary (all from the stored summary and
    embeddings of a trace verified as ``tracer.compare`` verifies it).

    Attributes:
        trace: path of the trace.
        run_id: the run id of the trace.
        plugin_sources: the plug-in source digests the trace records (``{}`` for built-in sides).
        verdict: ``diverged`` or ``agree``.
        first: the first divergence as stored (``None`` when the paths agree).
        drifting: which path drifts from the reference (``None`` without a reference).
        off_at_divergence: which path is beyond the bar at the divergence's own tap and token.
        cos: ``{pair: {sequence id: cosine}}`` of the mean-pooled final embeddings.
        first_layer_by_site: per site, the first layer where packed and unpacked diverge (``None`` = never).
        max_rel_l2_by_site: per site, the largest packed-vs-unpacked relative L2 error over layers and tokens.
    """

    trace: str
    run_id: str
    plugin_sources: dict
    verdict: str
    first: dict | None
    drifting: str | None
    off_at_divergence: str | None
    cos: dict
    first_layer_by_site: dict
    max_rel_l2_by_site: dict

    @classmethod
    def read(cls, path: Path) -> "TraceFacts":
        """The facts of the trace at ``path``, after verifying it as ``tracer.compare`` does
        (:func:`tracer.judging.tables.summarize`); a trace that does not verify is one
        :class:`TracerError` line."""
        from tracer.judging.tables import summarize  # torch-heavy: imported when a trace is read

        with open_trace(path) as t, reading(path):
            summarize(t)
            s = t.summary
            cos = pooled_cosines(t)
            run_id, sources = t.run_id, t.meta.get("plugin_sources", {})
        if s.get("verdict") not in VERDICTS:
            raise TracerError(f"{path} is damaged: its stored summary has no verdict ({s.get('verdict')!r})")
        att = s.get("attribution") or {}
        first_layer: dict[str, int | None] = {site: None for site in SITES}
        worst: dict[str, float | None] = {site: None for site in SITES}
        for entry in s.get("layers", []):
            for site, st in entry["taps"].items():
                if st.get("diverged_tokens") and first_layer.get(site) is None:
                    first_layer[site] = entry["layer"]
                v = st.get("max_rel_l2")
                if v is not None and (worst.get(site) is None or v > worst[site]):
                    worst[site] = v
        for glob in ("embed", "final_norm"):
            if s.get(glob):
                first_layer[glob] = -1 if s[glob].get("diverged_tokens") else None
                worst[glob] = s[glob].get("max_rel_l2")
        return cls(
            trace=str(path), run_id=run_id, plugin_sources=sources, verdict=s["verdict"], first=s.get("first_divergence"),
            drifting=att.get("drifting"), off_at_divergence=(att.get("at_divergence") or {}).get("off"),
            cos=cos, first_layer_by_site=first_layer, max_rel_l2_by_site=worst,
        )


def run_and_report(work, out: Path, unit: str, as_json: bool, format_markdown, files: str) -> int:
    """A campaign CLI's ending: run ``work()`` (no autograd), keep finished ``unit`` on Ctrl-C
    SIGTERM or SIGHUP (one line, exit 128 + signal number: 130, 143, 129; resumable), then print the record as JSON or Markdown plus where its ``files`` are."""
    import torch

    try:
        with torch.no_grad():
            record = work()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"tracer: {how}; finished {unit} are kept in {out}; rerun the same command to resume", file=sys.stderr)
        return 128 + signum
    if as_json:
        print(json.dumps(record, indent=2))
    else:
        print(format_markdown(record), end="")
        print(f"summary   {files}")
    return 0


def where(first: dict | None) -> str:
    """``layer 0 q_rope, large token 257`` (or ``none``)."""
    if not first:
        return "none"
    at = f"layer {first['layer']} {first['tap']}" if first.get("layer") is not None else first["tap"]
    return f"{at}, {first['sequence']} token {first['token']}"


def fmt_cos(c) -> str:
    """A cosine near 1 as ``1-3.2e-07`` (six decimals would hide it), otherwise six decimals."""
    if c is None:
        return "n/a"
    c = float(c)
    if c != c:
        return "nan"
    if c >= 1:
        return "1" if c == 1 else f"1+{c - 1:.1e}"
    return f"1-{1 - c:.1e}" if 1 - c < 1e-4 else f"{c:.6f}"
