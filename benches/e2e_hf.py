"""The headline pipeline written the way researchers write it today, with PyTorch and Hugging Face
transformers + tokenizers, to compare with xrun end to end: wall time and test accuracy.

    python benches/e2e_hf.py --data-root ../shared/data --objectives none,mlm --steps 600

It does the work of `xrun experiments/clue_tnews.toml --set model.norm=post` for the objectives it
is given (none, mlm):

- a WordPiece vocabulary (8,000 asked, min frequency 2) learned on TNEWS's 20k unlabeled headlines;
- a BERT (post-norm, 2 layers, d256, 4 heads, FFN 1024, 48 positions, dropout 0.1, none in
  attention: the model xrun builds for `norm = "post"`, which xrun exports as BERT);
- MLM pretraining on the unlabeled headlines, 2% held out: `--steps` steps of batch 64, 15% masked
  (80/10/10), AdamW lr 5e-4, weight decay 0.01, 6% warm-up then linear decay, clip 1.0, the
  held-out loss every 200 steps. As `BertForMaskedLM` does, the LM head scores every position;
- per few-shot split: fine-tuning from the pretrained encoder (or from scratch for `none`), batch
  32, up to 20 epochs, AdamW lr 2e-4, 10% warm-up, dev accuracy after each epoch, patience 5, the
  best epoch's weights scored on test_public (2,010 headlines, batch 128).

The pretraining runs once per objective and serves the five splits, as a careful script would.
Gradients are clipped by their global norm (xrun clips each tensor's, as burn does). Two ablations
move the classifier towards xrun's: `--no-pooler` and `--layer-norm-eps 1e-5`. A third,
`--zero-token-type`, starts BERT's token-type embedding at zero: with one segment, its single
random row is added to every token, which xrun's own models (no segments) do not have.
Batches are shuffled and padded to their longest (dynamic padding, as `DataCollatorWithPadding`).
The loss is read back every step, as the Trainer's logging does. Prints one JSON line per trial and
one summary line (`"summary": true`) with the wall time of every phase.
"""

import argparse
import copy
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from tokenizers import BertWordPieceTokenizer
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    get_linear_schedule_with_warmup,
)


def read_jsonl(path, key):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] if key != "*" else json.loads(line) for line in f if line.strip()]


def batches(n, size, rng):
    order = list(range(n))
    rng.shuffle(order)
    return [order[i : i + size] for i in range(0, n, size)]


def pad(seqs, pad_id):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def mask_tokens(ids, attn, special, vocab, prob, gen):
    """BERT's masking: `prob` of the real non-special tokens are predicted; of those 80% become
    [MASK], 10% a random token, 10% stay."""
    labels = ids.clone()
    candidates = attn.bool() & ~torch.isin(ids, special)
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & candidates
    labels[~chosen] = -100
    ids = ids.clone()
    roll = torch.rand(ids.shape, generator=gen)
    ids[chosen & (roll < 0.8)] = special_ids["[MASK]"]
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[rand] = torch.randint(len(special), vocab, ids.shape, generator=gen)[rand]
    return ids, labels


special_ids = {}


def first_token_forward(model):
    """BertForSequenceClassification's forward without the pooler: dropout and the linear layer on
    the first token's final hidden state, as xrun's classifier reads it."""
    from types import SimpleNamespace

    def forward(input_ids=None, attention_mask=None, labels=None):
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = model.classifier(model.dropout(hidden[:, 0]))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)

    return forward


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=os.environ.get("XRUN_DATA_ROOT", "../shared/data"))
    ap.add_argument("--objectives", default="none,mlm")
    ap.add_argument("--splits", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=600, help="pretraining steps")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    # Ablations towards xrun's own classifier, for the accuracy difference in BENCHMARKS.md.
    ap.add_argument("--layer-norm-eps", type=float, default=1e-12, help="BERT's 1e-12; xrun's own models use 1e-5")
    ap.add_argument("--no-pooler", action="store_true", help="classify the first token directly, as xrun does")
    ap.add_argument("--zero-token-type", action="store_true",
                    help="start the token-type embedding (one row, added to every token) at zero")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    phases = {}
    tnews = os.path.join(args.data_root, "fewclue", "tnews")

    # Tokenizer: learned on the unlabeled corpus, as xrun's [tokenizer] does.
    t0 = time.perf_counter()
    corpus = read_jsonl(os.path.join(tnews, "unlabeled.json"), "sentence")
    tok = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.train_from_iterator(
        corpus,
        vocab_size=8000,
        min_frequency=2,
        limit_alphabet=8000,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    )
    tok.enable_truncation(48)
    vocab = tok.get_vocab_size()
    for name in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]:
        special_ids[name] = tok.token_to_id(name)
    special = torch.tensor(sorted(special_ids.values()))
    encode = lambda texts: [e.ids for e in tok.encode_batch(texts)]
    phases["tokenizer_s"] = time.perf_counter() - t0

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=48,
        type_vocab_size=1,
        hidden_dropout_prob=0.1,
        layer_norm_eps=args.layer_norm_eps,
        attention_probs_dropout_prob=0.0,
        pad_token_id=special_ids["[PAD]"],
    )

    def fresh(cls, cfg):
        model = cls(cfg)
        if args.zero_token_type:
            with torch.no_grad():
                model.bert.embeddings.token_type_embeddings.weight.zero_()
        return model

    def adamw(model, lr, total, warmup):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        return opt, get_linear_schedule_with_warmup(opt, round(warmup * total), total)

    def pretrain():
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        rng = random.Random(args.seed)
        encoded = [s for s in encode(corpus)]
        order = list(range(len(encoded)))
        rng.shuffle(order)
        held = max(1, round(0.02 * len(encoded)))
        validation = [encoded[i] for i in order[:held]]
        train = [encoded[i] for i in order[held:]]
        model = fresh(BertForMaskedLM, config).to(device)
        opt, sched = adamw(model, 5e-4, args.steps, 0.06)
        gen = torch.Generator().manual_seed(args.seed)
        vgen_seed = args.seed + 1

        def validate():
            model.eval()
            gen_v = torch.Generator().manual_seed(vgen_seed)
            total, count = 0.0, 0
            with torch.no_grad():
                for i in range(0, len(validation), 128):
                    ids, attn = pad(validation[i : i + 128], special_ids["[PAD]"])
                    ids, labels = mask_tokens(ids, attn, special, vocab, 0.15, gen_v)
                    n = int((labels != -100).sum())
                    if n == 0:
                        continue
                    out = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device))
                    total, count = total + out.loss.item() * n, count + n
            model.train()
            return total / max(count, 1)

        step, losses = 0, []
        model.train()
        while step < args.steps:
            for rows in batches(len(train), 64, rng):
                ids, attn = pad([train[i] for i in rows], special_ids["[PAD]"])
                ids, labels = mask_tokens(ids, attn, special, vocab, 0.15, gen)
                if int((labels != -100).sum()) == 0:
                    continue
                out = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device))
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(out.loss.item())
                step += 1
                if step % 200 == 0 or step == args.steps:
                    val = validate()
                if step >= args.steps:
                    break
        return model.bert.state_dict(), time.perf_counter() - t0, {"train_loss": losses[-1], "validation_loss": val}

    def finetune(encoder, split):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        rng = random.Random(args.seed)
        train = read_jsonl(os.path.join(tnews, f"train_{split}.json"), "*")
        dev = read_jsonl(os.path.join(tnews, f"dev_{split}.json"), "*")
        test = read_jsonl(os.path.join(tnews, "test_public.json"), "*")
        labels = sorted({e["label_desc"] for e in train})
        index = {l: i for i, l in enumerate(labels)}

        def data(rows):
            kept = [e for e in rows if e["label_desc"] in index]
            return encode([e["sentence"] for e in kept]), torch.tensor([index[e["label_desc"]] for e in kept])

        (xtr, ytr), (xdev, ydev), (xte, yte) = data(train), data(dev), data(test)
        cfg = copy.deepcopy(config)
        cfg.num_labels = len(labels)
        model = fresh(BertForSequenceClassification, cfg)
        if args.no_pooler:
            model.bert.pooler = None  # transformers then returns no pooled output: read [CLS] below
            model.forward = first_token_forward(model)
        if encoder is not None:
            missing, unexpected = model.bert.load_state_dict(encoder, strict=False)
            assert not unexpected and all(k.startswith("pooler") for k in missing), (missing, unexpected)
        model.to(device)
        per_epoch = math.ceil(len(xtr) / 32)
        opt, sched = adamw(model, 2e-4, per_epoch * args.epochs, 0.1)

        def accuracy(x, y):
            model.eval()
            right = 0
            with torch.no_grad():
                for i in range(0, len(x), 128):
                    ids, attn = pad(x[i : i + 128], special_ids["[PAD]"])
                    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
                    right += int((logits.argmax(-1).cpu() == y[i : i + 128]).sum())
            model.train()
            return right / len(x)

        best, best_state, stale, epochs = -1.0, None, 0, 0
        model.train()
        for epoch in range(args.epochs):
            for rows in batches(len(xtr), 32, rng):
                ids, attn = pad([xtr[i] for i in rows], special_ids["[PAD]"])
                out = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=ytr[rows].to(device))
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                out.loss.item()
            epochs += 1
            acc = accuracy(xdev, ydev)
            if acc > best:
                best, best_state, stale = acc, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= 5:
                    break
        model.load_state_dict(best_state)
        test_acc = accuracy(xte, yte)
        return {"dev_accuracy": best, "test_accuracy": test_acc, "epochs": epochs}, time.perf_counter() - t0

    results, pretrain_s, finetune_s = [], 0.0, 0.0
    for objective in args.objectives.split(","):
        encoder = None
        if objective == "mlm":
            encoder, seconds, info = pretrain()
            pretrain_s += seconds
            print(json.dumps({"objective": objective, "pretrain_s": round(seconds, 1), **info}), flush=True)
        elif objective != "none":
            raise SystemExit(f"objective {objective!r}: this script does none and mlm")
        for split in args.splits.split(","):
            r, seconds = finetune(encoder, split)
            finetune_s += seconds
            row = {"objective": objective, "split": split, "finetune_s": round(seconds, 1), **r}
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {"summary": True, "implementation": "pytorch+transformers", "torch": torch.__version__,
               "threads": torch.get_num_threads(), "device": args.device, "vocab": vocab,
               "tokenizer_s": round(phases["tokenizer_s"], 1), "pretrain_s": round(pretrain_s, 1),
               "finetune_s": round(finetune_s, 1), "wall_s": round(time.perf_counter() - started, 1)}
    for objective in args.objectives.split(","):
        accs = [r["test_accuracy"] * 100 for r in results if r["objective"] == objective]
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1)) ** 0.5
        summary[f"{objective}_test_accuracy"] = f"{mean:.1f} ± {std:.1f}"
    print(json.dumps(summary, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
