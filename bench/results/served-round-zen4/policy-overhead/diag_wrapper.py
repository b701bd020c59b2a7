import sys, json
sys.path.insert(0, "bench")
import served_round_check as src
from gsd_serve.serving.load_policy import LoadPolicy
log = []
orig = LoadPolicy.decide
def decide(self, sessions_here=1, session=None):
    d = orig(self, sessions_here, session)
    if d.budget > 1 and d.reason == "measured" and sessions_here >= 3 and len(log) < 12:
        log.append({"n": sessions_here, "batch": self.batch.value, "b": d.budget, "rates": {k: round(v,1) for k,v in d.rates.items()},
                    "cost": [(round(r,1), round(s*1000,1)) for r,s in self.cost.points()],
                    "acc": {b: round(e.value,2) for b,e in self.accepted.items() if e.value is not None},
                    "size": {b: round(e.value,1) for b,e in self.tree.items() if e.value is not None},
                    "draft": {b: round(e.value*1000,1) for b,e in self.draft.items() if e.value is not None},
                    "o": round((self.overhead.value or 0)*1000,2)})
    return d
LoadPolicy.decide = decide
if __name__ == "__main__":
    src.main(sys.argv[1:])
    for x in log: print(json.dumps(x))
