"""Where PyTorch eager f32 spends a bert-mini (or other shape) MLM step on the CPU: torch.profiler's
self-CPU table over 6 steps after 2 warm-up steps, with benches/pytorch_reference.py's model, batches
(batch 32, lengths 16-128) and optimiser. Used for BENCHMARKS.md, "Where the time goes, side by side".

    python benches/cpu-2026-12-01/torch-profile.py bert-mini
"""
import os, sys, random, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import torch, torch.nn.functional as F
import pytorch_reference as R
torch.set_num_threads(os.cpu_count())
class A: pass
args=A(); args.min_len=16; args.seq=128; args.vocab=21128; args.batch=32; args.seed=0
layers,d,heads,ff,causal=R.SHAPES[sys.argv[1]]
rng=random.Random(0)
seqs=R.sequences(8*32,args,rng)
prep=[]
for i in range(8):
    ids,pad,pos,tg,_,_=R.batch(seqs[i*32:(i+1)*32],causal,rng)
    prep.append((torch.tensor(ids),torch.tensor(pad),torch.tensor(pos),torch.tensor(tg)))
torch.manual_seed(0)
model=R.Model(args.vocab,args.seq,layers,d,heads,ff,causal); model.train()
opt=torch.optim.AdamW(model.parameters(),lr=1e-4,weight_decay=0.01)
def step(b):
    ids,pad,pos,tg=b
    logits=model(ids,pad,pos); loss=F.cross_entropy(logits.float(),tg)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(),1.0); opt.step()
for b in prep[:2]: step(b)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    t=time.perf_counter()
    for b in prep[2:]: step(b)
    print('ms/step',(time.perf_counter()-t)*1000/6)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35))
