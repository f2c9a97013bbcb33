"""The control path: tracer's own healthy low-precision forward, which sets the noise level.

A low-precision implementation is judged against the error of an *independent* plain
low-precision implementation, never against itself (the rule of FlashAttention's tests). The
control is that implementation: :class:`tracer.esm.packed_forward.PackedESM2` with

* no faults, ever (no switch, no perturbation);
* the model in the run dtype, fair-esm's numerics op for op (:mod:`tracer.esm.packed_forward`);
* RoPE in float32 on the rotary modules' inverse frequencies *as loaded*
  (:func:`tracer.esm.models.loaded_inv_freq`, the frequencies the reference uses), so the control
  carries none of the RoPE rounding the paths under test may carry;
* the run's attention backend (for a packed plug-in that names none, the backend the built-in
  path would take on this device and dtype).

Its per-token error against the reference (pair ``control-vs-reference``) gives every tap's
noise level (:func:`tracer.judging.verdict.thresholds`). It runs as one more lockstep stream named
``control``, or, when the packed path under test *is* this configuration (built-in, ``--packed-rope
fp32``, no packed fault), that path's taps serve as the control's and nothing runs twice. Either
way the trace's meta records which (``meta["control"]``).

Example::

    control = plan_control(True, "fp32", Faults(), attention.resolve("auto", device, dtype), has_reference=True)
    path = control.path(model)   # None when reused
"""

from __future__ import annotations

from dataclasses import dataclass


from tracer.capture.paths import BuiltinPackedPath
from tracer.esm import attention
from tracer.esm.packed_forward import PackedESM2
from tracer.inputs.faults import Faults

NAME = "control"
WHAT = "tracer's built-in packed forward, no faults, run dtype, RoPE in float32 on the loaded frequencies"


@dataclass(frozen=True)
class Control:
    """Which control a run has.

    Attributes:
        reused: the packed path under test is exactly the control's configuration, so its
            taps serve as the control's (no separate stream).
        backend: the control's attention backend.
    """

    reused: bool
    backend: attention.Backend

    def path(self, model) -> BuiltinPackedPath | None:
        """The separate lockstep path (named ``control``), or ``None`` when reused."""
        if self.reused:
            return None
        path = BuiltinPackedPath(PackedESM2(model, self.backend, rope="fp32", faults=Faults()), name=NAME)
        path.label = f"control: {path.label}"
        return path

    def to_meta(self) -> dict:
        return {
            "what": WHAT,
            "rope": "fp32",
            "faults": "none",
            "backend": self.backend.name,
            "reused": self.reused,
            "source": "the packed path under test (same configuration)" if self.reused else "a separate lockstep stream",
        }


def is_control_config(packed_builtin: bool, packed_rope: str, faults: Faults) -> bool:
    """Whether the packed path under test is the control's configuration: built-in, fp32 RoPE,
    and no fault that acts on the packed side (switches or packed perturbations)."""
    return packed_builtin and packed_rope == "fp32" and not faults.switches and not faults.perturbations_of("packed")


def plan_control(packed_builtin: bool, packed_rope: str, faults: Faults, backend: attention.Backend,
                 has_reference: bool) -> Control | None:
    """The run's control, or ``None`` without a reference (the control is judged against it).

    ``backend``: the attention backend of the run's packed path; for a packed plug-in that does
    not name one, the caller passes the default the built-in path would take on the run's device
    and dtype.
    """
    if not has_reference:
        return None
    return Control(is_control_config(packed_builtin, packed_rope, faults), backend)
