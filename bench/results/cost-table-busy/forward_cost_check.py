import time, torch
from gsd_serve.models import load_engine
eng, tok = load_engine()
for name, r in (("draft", eng.draft), ("target", eng.target)):
    print(name, type(r).__name__)
    for n in (1, 4, 64, 200):
        ts=[]
        for _ in range(5):
            c = r.new_cache()
            toks = torch.randint(100, 1000, (n,))
            t=time.perf_counter(); r.forward(c, toks, last_only=True); ts.append(time.perf_counter()-t)
        print(f"  {n} tokens: {min(ts)*1000:.1f} ms ({min(ts)*1000/n:.3f} ms/token)")
