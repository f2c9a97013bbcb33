"""The adapter tracer needs around a team's own packed forward: ten lines.

    python -m tracer.run --packed examples/packed_esm2_adapter.py:make_forward --seq-len 400
"""

from packed_esm2 import PackedESM2Wrapper  # the team's own code, next to this file


def make_forward(model, alphabet):
    """tracer calls this once with the fair-esm model, already in the run dtype and device."""
    wrapper = PackedESM2Wrapper(model)

    def forward(tokens, cu_seqlens, max_seqlen):  # (N,), (B+1,) int32, int -> (N, E)
        out = wrapper.forward_packed(tokens, cu_seqlens, max_seqlen, repr_layers=[model.num_layers])
        return out["representations"][model.num_layers]

    return forward
