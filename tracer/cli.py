"""Shared command-line plumbing: one-line errors, warnings, and the verdict-rule options."""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import warnings

from tracer.runner import interrupts
from tracer.errors import TracerError
from tracer.judging.verdict import NOISE_FACTOR, PLAIN_MAX_REL_L2, Rule
from tracer.taps import SITES


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and a pointer to --help), exit status 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def one_line(text: str) -> str:
    """A message as one printable line (damaged files can put anything in a name or record)."""
    text = " ".join(text.split("\n"))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def main_guard(fn=None, *, unwritten: str = interrupts.NOTHING_WRITTEN):
    """Run a CLI ``main``: :class:`TracerError` -> one line on stderr and exit 2; Ctrl-C,
    SIGTERM, SIGHUP -> one line and exit 128 + signal number (:mod:`tracer.runner.interrupts`).

    ``unwritten`` names what the command writes, for the line of a signal that came before it
    was written (``@main_guard(unwritten="no bundle was written")``). In a ``python -m`` process
    the command then ends at once (:func:`tracer.runner.interrupts.end_process`)."""
    if fn is None:
        return lambda f: main_guard(f, unwritten=unwritten)

    @functools.wraps(fn)
    def wrapper(argv=None) -> int:
        return interrupts.end_process(guarded(argv))

    def guarded(argv=None) -> int:
        interrupts.set_unwritten(unwritten)
        def show(message, category, filename, lineno, file=None, line=None):
            print(f"tracer: warning: {message}", file=sys.stderr)

        with warnings.catch_warnings():
            warnings.showwarning = show
            try:
                with interrupts.handling():
                    return fn(argv)
            except TracerError as e:
                print(f"tracer: error: {one_line(str(e))}", file=sys.stderr)
                return 2
            except KeyboardInterrupt as e:
                signum = getattr(e, "signum", signal.SIGINT)
                print(interrupts.message(signum), file=sys.stderr)
                return 128 + signum
            except BrokenPipeError:  # `... | head` closed our stdout: not an error of the run
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0

    return wrapper


def _threshold(text: str):
    site, eq, value = text.rpartition("=")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not VALUE or SITE=VALUE") from None
    if eq and site not in SITES and site not in ("embed", "final_norm"):
        raise argparse.ArgumentTypeError(f"unknown site {site!r} in {text!r}; sites: {', '.join(SITES)}, embed, final_norm")
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"threshold {text!r} must be a finite positive number")
    return (site or None, number)


NOISE_FACTOR_MAX = 100.0
"""Largest K of the noise rule. The noise level of a bfloat16 run is about 4e-3 (relative L2 of
rounding); K x noise above ~1.4 -- the relative L2 error of two unrelated vectors -- would call
nothing diverged, so a K near 350 turns detection off. 100 keeps a bar below that everywhere."""


def bounded_int(flag: str, low: int, high: int, what: str = ""):
    """An argparse ``type``: an integer in ``[low, high]``, else one line naming the range.

    Catches numbers too large for the C integers behind ``range``, tensors and files (no
    ``OverflowError`` traceback later).
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            why = f" ({what})" if what else ""
            raise argparse.ArgumentTypeError(f"{text} is out of range; {flag} takes integers from {low:,} to {high:,}{why}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid integer value"
    return parse


def _noise_factor(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"K must be a finite positive number, got {text!r}")
    if number > NOISE_FACTOR_MAX:
        raise argparse.ArgumentTypeError(
            f"K must be at most {NOISE_FACTOR_MAX:g}, got {text!r}: a bar of K x the noise level above ~1.4 "
            "(the relative L2 error of unrelated vectors) calls nothing diverged, which turns detection off"
        )
    return number


def _min_cos(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not -1 <= number <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"a cosine similarity lies in [-1, 1], got {text!r}")
    return number


def add_rule_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verdict rule (docs/verdict.md)")
    g.add_argument(
        "--rule", choices=("noise", "plain"), default=None,
        help="noise: relative L2 error above K x the tap's noise level, estimated against the reference "
        "(default when a reference was traced); plain: fixed thresholds (default otherwise)",
    )
    g.add_argument("--noise-factor", type=_noise_factor, default=None, metavar="K", help=f"K of the noise rule (default {NOISE_FACTOR:g})")
    g.add_argument(
        "--max-rel-l2", type=_threshold, action="append", default=[], metavar="[SITE=]VALUE",
        help="plain rule: relative L2 threshold, globally or for one site (repeatable), e.g. "
        f"--max-rel-l2 0.02 --max-rel-l2 q_rope=0.1 (defaults: {', '.join(f'{k} {v:g}' for k, v in PLAIN_MAX_REL_L2.items())})",
    )
    g.add_argument("--min-cos", type=_min_cos, default=None, metavar="VALUE", help="plain rule: also diverged when cosine similarity < VALUE")


def global_threshold(args) -> float | None:
    """The last ``--max-rel-l2 VALUE`` without a site, if any."""
    values = [v for s, v in args.max_rel_l2 if s is None]
    return values[-1] if values else None


def rule_from_args(args, dtype: str, has_reference: bool) -> Rule | None:
    """The :class:`Rule` the options ask for, or ``None`` when none was given (run defaults)."""
    value = global_threshold(args)
    sites = {s: v for s, v in args.max_rel_l2 if s is not None}
    if args.rule is None and args.noise_factor is None and not args.max_rel_l2 and args.min_cos is None:
        return None
    kind = args.rule or ("plain" if (args.max_rel_l2 or args.min_cos is not None) else ("noise" if has_reference else "plain"))
    if kind == "noise" and not has_reference:
        raise TracerError("--rule noise needs a reference path; trace with --reference fp32 (or fp64), or use --rule plain")
    if args.noise_factor is not None and not 0 < args.noise_factor <= NOISE_FACTOR_MAX:
        raise TracerError(f"--noise-factor must be in (0, {NOISE_FACTOR_MAX:g}], got {args.noise_factor}")
    return Rule(
        kind=kind,
        noise_factor=args.noise_factor if args.noise_factor is not None else NOISE_FACTOR,
        max_rel_l2=value if value is not None else PLAIN_MAX_REL_L2[dtype],
        site_max_rel_l2=sites,
        min_cos=args.min_cos,
    )


MAX_LAYER = 9999
"""No layer number above this is even looked up (ESM-2 models have at most 48 layers)."""

SEED_RANGE = (0, 2**64 - 1)
"""Seeds ``torch.manual_seed`` accepts (non-negative)."""


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0,3,5-7"`` -> ``(0, 3, 5, 6, 7)``; empty parts, reversed ranges and absurd numbers are errors."""
    if not text.strip():
        raise TracerError("--layers is empty; give layer numbers like 0,3,5-7 (or leave it out for all layers)")
    out: set[int] = set()
    for part in text.split(","):
        lo_text, dash, hi_text = part.strip().partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text) if dash else int(lo_text)
        except ValueError:
            raise TracerError(f"--layers {text!r}: expected layer numbers like 0,3,5-7") from None
        if max(lo, hi) > MAX_LAYER:
            raise TracerError(f"--layers {text!r}: layer {max(lo, hi)} does not exist (ESM-2 models have at most 48 layers)")
        if hi < lo:
            raise TracerError(f"--layers {text!r}: the range {part.strip()} is empty (write low-high, e.g. {hi}-{lo})")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def parse_taps(text: str) -> tuple[str, ...]:
    """``"ctx,resid_out"`` -> ``("ctx", "resid_out")``; empty names are errors."""
    taps = tuple(t.strip() for t in text.split(","))
    if not any(taps):
        raise TracerError("--taps is empty; name sites like ctx,resid_out (or leave it out for all taps)")
    if not all(taps):
        raise TracerError(f"--taps {text!r} has an empty name; write names separated by single commas")
    return taps


seed = bounded_int("--seed", *SEED_RANGE, "seeds torch.manual_seed accepts")
"""``--seed``: an integer ``torch.manual_seed`` accepts."""


def add_run_options(p: argparse.ArgumentParser, dtype_help: str = "dtype of both paths (default bfloat16)") -> None:
    """The model, path and numerics options of every tool that runs the model (``tracer.run``,
    ``tracer.experiments``, ``tracer.sweep``), declared once. Imports lazily: the read-only tools
    import this module without fair-esm."""
    from tracer.env import DTYPES
    from tracer.esm.attention import BACKENDS
    from tracer.esm.models import ARCHITECTURES, DEFAULT_MODEL
    from tracer.esm.packed_forward import ROPE_MODES
    from tracer.runner.config import REFERENCES

    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, metavar="NAME", help=f"fair-esm ESM-2 name (default {DEFAULT_MODEL}); one of {', '.join(ARCHITECTURES)}")
    m.add_argument(
        "--weights", default="auto", metavar="auto|random|PATH",
        help="auto: fair-esm's checkpoint from the torch-hub cache, else download; random: the architecture with "
        "seeded random weights (no checkpoint needed); PATH: a fair-esm .pt file or a local Hugging Face folder "
        "(config.json + *.safetensors) (default auto)",
    )
    m.add_argument("--seed", type=seed, default=0, help="seed of --weights random (default 0)")
    m.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")

    w = p.add_argument_group("the two paths (default: tracer's own packed forward vs fair-esm's padded forward)")
    w.add_argument(
        "--packed", default="builtin", metavar="SPEC",
        help="packed side: builtin, hf (Hugging Face EsmModel padding-free: one row, position_ids restarting per "
        "sequence, attention per --attn; docs/huggingface.md), package.module:factory or path/to/file.py:factory, where "
        "factory(model, alphabet) returns forward(tokens (N,), cu_seqlens (B+1,) int32, max_seqlen) -> (N, E) "
        "(the representation after emb_layer_norm_after); taps are captured from the fair-esm modules and "
        "the attention kernel it calls (docs/plugins.md)",
    )
    w.add_argument(
        "--unpacked", default="fair-esm", metavar="SPEC",
        help="unpacked side: fair-esm (ESM2.forward, default), hf (Hugging Face EsmModel, padded) or a factory SPEC "
        "returning forward(tokens (B, T)) -> (B, T, E)",
    )
    w.add_argument(
        "--hf-dtype-by", choices=("to", "from_pretrained"), default="to",
        help="how the hf paths get --dtype: to = model.to(dtype) (casts the rotary inv_freq buffer too), "
        "from_pretrained = from_pretrained(dtype=...) (keeps the buffer float32) (default to)",
    )
    w.add_argument("--hf-attn", choices=("sdpa", "eager"), default="sdpa", help="attn_implementation of --unpacked hf (default sdpa, HF's default)")

    n = p.add_argument_group("numerics")
    n.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: CUDA if available)")
    n.add_argument("--dtype", choices=[d for d in DTYPES if d != "float64"], default="bfloat16", help=dtype_help)
    n.add_argument("--attn", choices=BACKENDS, default="auto", help="attention of the builtin packed path: flash-attn package, PyTorch's varlen FlashAttention, or exact math (default auto: best available)")
    n.add_argument("--packed-rope", choices=ROPE_MODES, default="fp32", help="RoPE of the builtin packed path: fp32, or 'model' = exactly fair-esm's rotary module in the model dtype (default fp32)")
    n.add_argument("--reference", choices=REFERENCES, default="auto", help="high-precision reference path (default auto: fp32 for 16-bit runs, none for float32)")
