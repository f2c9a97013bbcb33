"""Train a small ESM-2 whose attention depends sharply on position, and save it as a fair-esm checkpoint.

Why: with random weights the bfloat16 RoPE error in q/k barely reaches the final embeddings,
because random attention hardly depends on position. No released ESM-2 checkpoint can be
downloaded in our workspace, so this script makes a model that behaves like a trained one in the
way that matters: its masked tokens can only be predicted by attending to the token a fixed
distance away.

Corpus (synthetic, generated on the fly from the seed): every sequence has a period ``o`` drawn
from ``--offsets`` (default 4, 16, 48, 100, 200 residues). Its first ``o`` residues are uniform
over the 20 standard amino acids; residue ``i >= o`` is ``PERM[residue i - o]`` (a fixed
permutation of the 20), and then 10% of all residues are replaced by uniform noise. A masked
residue is therefore predictable from the residues ``o`` before and ``o`` after it, i.e. only
through attention at exact relative offsets (RoPE), up to 200 positions away, in sequences of
up to ``--max-len`` residues (default 600, so well past position 256).

Training: fair-esm's own ``ESM2`` module (default 6 layers, 320 dims, 20 heads: the shape of
``esm2_t6_8M_UR50D``, so tracer recognises it), masked-language modelling as ESM-2 was trained
(15% of residues chosen; 80% ``<mask>``, 10% random, 10% kept), AdamW, warm-up then cosine decay.
On CUDA the forward/backward run under bfloat16 autocast with float32 master weights; on the CPU
everything is float32. The saved weights are float32.

Output: a fair-esm-format checkpoint (``{"cfg": {"model": Namespace(...)}, "model": state}``, keys
prefixed ``encoder.sentence_encoder.`` like the released files), written atomically, plus a JSON
log next to it (settings, loss curve, held-out masked accuracy for positions <= 256 and > 256).
The same seed and settings give the same corpus and initialisation; the weights match bit for
bit on the CPU, and on CUDA up to the GPU's non-deterministic reductions in the backward pass.

Examples::

    python examples/train_small_esm.py --out trained/small_esm.pt                    # GPU, ~3 min on an H100
    python examples/train_small_esm.py --out /tmp/t.pt --layers 2 --dim 64 --heads 4 --steps 3 --max-len 40 --device cpu
    python -m tracer.run --weights trained/small_esm.pt --seq-len 400
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def corpus_batch(gen: torch.Generator, batch: int, min_len: int, max_len: int, offsets: list[int], perm: torch.Tensor,
                 noise: float = 0.1) -> list[torch.Tensor]:
    """``batch`` sequences as residue indices into :data:`AMINO` (CPU int64), from ``gen``."""
    out = []
    for _ in range(batch):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        o = offsets[int(torch.randint(len(offsets), (1,), generator=gen))]
        first = torch.randint(20, (o,), generator=gen)
        i = torch.arange(n)
        seq = perm_powers(perm, (n - 1) // o + 1)[i // o, first[i % o]]  # residue i = PERM[residue i - o]
        flip = torch.rand(n, generator=gen) < noise
        seq[flip] = torch.randint(20, (int(flip.sum()),), generator=gen)
        out.append(seq)
    return out


def perm_powers(perm: torch.Tensor, k: int) -> torch.Tensor:
    """``(k, 20)``: row ``j`` is ``perm`` applied ``j`` times (row 0 the identity)."""
    rows = [torch.arange(20)]
    for _ in range(k - 1):
        rows.append(perm[rows[-1]])
    return torch.stack(rows)


def encode(seqs: list[torch.Tensor], alphabet, aa_idx: torch.Tensor, gen: torch.Generator, mask_prob: float = 0.15):
    """fair-esm tokens ``(B, T)`` with ESM-2's masking, and labels (``-100`` where not predicted)."""
    t = max(len(s) for s in seqs) + 2
    tokens = torch.full((len(seqs), t), alphabet.padding_idx, dtype=torch.long)
    labels = torch.full_like(tokens, -100)
    for b, s in enumerate(seqs):
        ids = aa_idx[s]
        tokens[b, 0], tokens[b, len(s) + 1] = alphabet.cls_idx, alphabet.eos_idx
        tokens[b, 1 : len(s) + 1] = ids
        chosen = torch.rand(len(s), generator=gen) < mask_prob
        labels[b, 1 : len(s) + 1][chosen] = ids[chosen]
        r = torch.rand(len(s), generator=gen)
        body = tokens[b, 1 : len(s) + 1]
        body[chosen & (r < 0.8)] = alphabet.mask_idx
        rand = chosen & (r >= 0.8) & (r < 0.9)
        body[rand] = aa_idx[torch.randint(20, (int(rand.sum()),), generator=gen)]
    return tokens, labels


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def save_checkpoint(model, args, log: dict, path: Path) -> None:
    """fair-esm's released on-disk format, written to a temporary file and renamed into place."""
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("contact_head."):
            continue  # released files keep the contact regression separately
        prefix = "encoder." if k.startswith("lm_head.") else "encoder.sentence_encoder."
        state[prefix + k] = v.detach().to("cpu", torch.float32).clone()
    cfg = argparse.Namespace(encoder_layers=args.layers, encoder_embed_dim=args.dim,
                             encoder_attention_heads=args.heads, token_dropout=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"cfg": {"model": cfg}, "model": state, "training": json.dumps(log)}, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, batches, device, boundary: int = 256) -> dict:
    """Masked-token accuracy on held-out batches, split at position ``boundary``."""
    model.eval()
    hit = {"near": 0, "far": 0}
    total = {"near": 0, "far": 0}
    for tokens, labels in batches:
        logits = model(tokens.to(device))["logits"].float().cpu()
        pred = logits.argmax(-1)
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        for key, sel in (("near", pos <= boundary), ("far", pos > boundary)):
            m = (labels != -100) & sel
            hit[key] += int((pred[m] == labels[m]).sum())
            total[key] += int(m.sum())
    model.train()
    return {f"masked_acc_pos_{'le' if k == 'near' else 'gt'}_{boundary}": (hit[k] / total[k] if total[k] else None) for k in hit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint path (.pt); a JSON log is written next to it")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dim", type=int, default=320)
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=600)
    p.add_argument("--offsets", default="4,16,48,100,200", help="periods of the corpus, residues")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"train_small_esm: error: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    if args.dim % args.heads or args.min_len < 1 or args.max_len < args.min_len:
        print("train_small_esm: error: --dim must be a multiple of --heads and 1 <= --min-len <= --max-len", file=sys.stderr)
        return 2
    offsets = [int(x) for x in args.offsets.split(",")]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            return train(args, out, offsets, device)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def train(args, out: Path, offsets: list[int], device: torch.device) -> int:
    """The training run (seeded; the caller restores the global RNG and deterministic settings)."""
    from esm.model.esm2 import ESM2

    torch.manual_seed(args.seed)
    model = ESM2(num_layers=args.layers, embed_dim=args.dim, attention_heads=args.heads, alphabet="ESM-1b", token_dropout=True)
    alphabet = model.alphabet
    model.to(device).train()
    aa_idx = torch.tensor([alphabet.get_idx(a) for a in AMINO])
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(20, generator=gen)
    held_gen = torch.Generator().manual_seed(args.seed + 1)
    held = [encode(corpus_batch(held_gen, args.batch, max(args.min_len, args.max_len // 2), args.max_len, offsets, perm), alphabet, aa_idx, held_gen)
            for _ in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    log = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "force")}, "device": str(device),
           "torch": torch.__version__, "loss": []}
    t0 = time.perf_counter()
    for step in range(args.steps):
        tokens, labels = encode(corpus_batch(gen, args.batch, args.min_len, args.max_len, offsets, perm), alphabet, aa_idx, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        with autocast:
            logits = model(tokens.to(device))["logits"]  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            log["loss"].append([step, round(float(loss.detach()), 4)])
            print(f"step {step + 1}/{args.steps} loss {float(loss.detach()):.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    log["seconds"] = round(time.perf_counter() - t0, 1)
    log["held_out"] = evaluate(model, held, device)
    print(f"held-out masked accuracy: {log['held_out']} (chance 0.05)", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args, log, out)
    log_path = out.with_suffix(".json")
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
