"""The PyTorch side of `xrun bench`: the same shapes, data, objective and optimiser, one JSON line
per shape with the same fields, so both are measured in one run on one machine.

    python benches/pytorch_reference.py --shape bert-mini --device cpu --steps 20
    python benches/pytorch_reference.py --shape bert-base --device cuda --precision bf16

The model mirrors xrun's: learned positions, BERT post-norm (bert-*) or GPT-2 pre-norm with a causal
mask (gpt-small), GELU feed-forward, no attention dropout, dropout 0.1 elsewhere; the LM head
(dense, GELU, LayerNorm, projection) scores only the masked positions (MLM, 15% of tokens) or
every real position (AR), as xrun's does, and the last layer computes past attention only for
those positions, as xrun's has since 2026-11-30 (before, both computed every position there).
AdamW (lr 1e-4, weight decay 0.01, clip norm 1.0), the losses read back every 16 steps, as xrun's
loop does. Sequences are random ids with lengths uniform in [min_len, seq], each batch padded to
its longest; with `--lengths-from FILE` (the JSON lines of `xrun bench`) each step's batch has the
lengths xrun's had for that shape, so both train the same shapes of batches:

    xrun bench --backend cpu --shape bert-mini > xrun.jsonl
    python benches/pytorch_reference.py --device cpu --shape bert-mini --lengths-from xrun.jsonl

Precision: f32 (eager), or bf16 autocast on
CUDA. `step_ms` is the mean over the measured steps (after the warm-up).
"""

import argparse
import json
import math
import os
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = {
    "bert-mini": (4, 256, 4, 1024, False),
    "bert-small": (4, 512, 8, 2048, False),
    "bert-base": (12, 768, 12, 3072, False),
    "gpt-small": (12, 768, 12, 3072, True),
}
PAD, CLS, SEP, MASK = 0, 2, 3, 4


class Block(nn.Module):
    def __init__(self, d, heads, ff, pre_norm):
        super().__init__()
        self.heads, self.pre_norm = heads, pre_norm
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(0.1)

    def attend(self, x, mask, keep):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(keep(y.transpose(1, 2).reshape(b * s, d)))

    def forward(self, x, mask, rows=None):
        """`x` [b, s, d]; returns the rows `rows` (flat indices into b * s; all when None) of the
        output, [n, d]. Past attention only those rows are computed, as in xrun's last layer."""
        b, s, d = x.shape
        keep = (lambda t: t) if rows is None else (lambda t: t[rows])
        if self.pre_norm:
            x = keep(x.reshape(b * s, d)) + self.drop(self.attend(self.norm1(x), mask, keep))
            return x + self.drop(self.down(F.gelu(self.up(self.norm2(x)))))
        x = self.norm1(keep(x.reshape(b * s, d)) + self.drop(self.attend(x, mask, keep)))
        return self.norm2(x + self.drop(self.down(F.gelu(self.up(x)))))


class Model(nn.Module):
    def __init__(self, vocab, seq, layers, d, heads, ff, causal):
        super().__init__()
        self.causal = causal
        self.tokens, self.positions = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.embed_norm = None if causal else nn.LayerNorm(d)
        self.final_norm = nn.LayerNorm(d) if causal else None
        self.blocks = nn.ModuleList(Block(d, heads, ff, causal) for _ in range(layers))
        self.drop = nn.Dropout(0.1)
        self.dense, self.head_norm, self.decoder = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids, pad, positions):
        b, s = ids.shape
        x = self.tokens(ids) + self.positions(torch.arange(s, device=ids.device))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        # True = attend: every real key, and (causal) no later one.
        mask = (~pad)[:, None, None, :]
        if self.causal:
            mask = mask & torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
        for block in self.blocks[:-1]:
            x = block(x, mask).reshape(b, s, -1)
        picked = self.blocks[-1](x, mask, positions)
        if self.final_norm is not None:
            picked = self.final_norm(picked)
        return self.decoder(self.head_norm(F.gelu(self.dense(picked))))


def sequences(n, args, rng):
    out = []
    for _ in range(n):
        length = rng.randint(max(args.min_len, 3), args.seq)
        out.append(sequence(length, args, rng))
    return out


def sequence(length, args, rng):
    return [CLS] + [rng.randrange(5, args.vocab) for _ in range(length - 2)] + [SEP]


def replayed(name, args):
    """Each step's sequence lengths from xrun's figures for `name` in `args.lengths_from`."""
    with open(args.lengths_from) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    found = [line for line in lines if line.get("shape") == name and "batch_lengths" in line]
    if not found:
        raise SystemExit(f"{args.lengths_from}: no `xrun bench` line with batch_lengths for {name}")
    steps = found[-1]["batch_lengths"]
    total = args.warmup + args.steps
    if len(steps) < total:
        raise SystemExit(f"{args.lengths_from}: {name} has {len(steps)} steps' lengths; --warmup + --steps is {total}")
    if any(n < 3 or n > args.seq for lengths in steps for n in lengths):
        raise SystemExit(f"{args.lengths_from}: {name} has a length outside 3..={args.seq} (--seq)")
    return steps[:total]


def batch(seqs, causal, rng):
    width = max(len(s) for s in seqs)
    ids = [s + [PAD] * (width - len(s)) for s in seqs]
    pad = [[False] * len(s) + [True] * (width - len(s)) for s in seqs]
    positions, targets = [], []
    for b, s in enumerate(seqs):
        for i in range(len(s)):
            if causal:
                if i + 1 < len(s):
                    positions.append(b * width + i)
                    targets.append(s[i + 1])
            elif 0 < i < len(s) - 1 and rng.random() < 0.15:
                positions.append(b * width + i)
                targets.append(s[i])
                ids[b][i] = MASK
    if not positions:
        positions, targets = [1], [seqs[0][1]]
    return ids, pad, positions, targets, sum(len(s) for s in seqs), len(seqs) * width


def run(name, args):
    import random

    layers, d, heads, ff, causal = SHAPES[name]
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    total = args.warmup + args.steps
    if args.lengths_from:
        steps = [[sequence(n, args, rng) for n in lengths] for lengths in replayed(name, args)]
    else:
        seqs = sequences(total * args.batch, args, rng)
        steps = [seqs[i * args.batch:(i + 1) * args.batch] for i in range(total)]
    prepared = []
    for i in range(total):
        ids, pad, positions, targets, real, padded = batch(steps[i], causal, rng)
        prepared.append((
            torch.tensor(ids, device=device), torch.tensor(pad, device=device),
            torch.tensor(positions, device=device), torch.tensor(targets, device=device), real, padded,
        ))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = Model(args.vocab, args.seq, layers, d, heads, ff, causal).to(device)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    bf16 = args.precision == "bf16"
    pending = []
    for i, (ids, pad, positions, targets, _, _) in enumerate(prepared):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, pad, positions)
            loss = F.cross_entropy(logits.float(), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        pending.append(loss.detach())
        # The host reads the losses every --read-every steps, as xrun's loop does (and at the
        # points timed: the first step, the end of the warm-up, the end).
        if len(pending) >= args.read_every or i + 1 in (1, args.warmup, total):
            values = torch.stack(pending).tolist()
            pending = []
            if not all(math.isfinite(v) for v in values):
                raise SystemExit(f"{name}: loss became {values}")
        if i == 0:
            first = time.perf_counter() - started
        if i + 1 == args.warmup:
            warm = time.perf_counter()
    seconds = time.perf_counter() - warm
    window = prepared[args.warmup:]
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {
        "shape": name,
        "objective": "ar" if causal else "mlm",
        "backend": f"pytorch {torch.__version__} eager",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "precision": args.precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "time_to_first_step_s": first,
        "step_ms": seconds * 1000 / args.steps,
        "tokens_per_s": sum(w[5] for w in window) / seconds,
        "effective_tokens_per_s": sum(w[4] for w in window) / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mib": peak,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=21128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--read-every", type=int, default=16, help="read the losses back every N steps")
    p.add_argument("--lengths-from", metavar="FILE", help="replay each step's sequence lengths from `xrun bench`'s JSON lines")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    if args.warmup < 1:
        p.error("--warmup must be at least 1")
    if args.precision == "bf16" and args.device == "cpu":
        p.error("bf16 autocast is measured on CUDA")
    torch.set_num_threads(args.threads)
    for name in args.shape or ["bert-mini"]:
        print(json.dumps(run(name, args)), flush=True)


if __name__ == "__main__":
    main()
