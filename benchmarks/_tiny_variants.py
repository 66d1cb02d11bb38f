import json, sys, time, torch, torch.nn.functional as F
import models
from models.backbones import TinyBackbone
torch.set_num_threads(2)
variants = json.loads(sys.argv[1])
prof = len(sys.argv) > 2
for v in variants:
    models.BACKBONES["tiny"] = lambda weights=None, w=tuple(v["widths"]): TinyBackbone(w)
    for h, kw in v.get("heads", {}).items():
        models.TINY_HEAD_KWARGS[h] = {**models.TINY_HEAD_KWARGS[h], **kw}
    for name in v["names"]:
        torch.manual_seed(0)
        m = models.create(name, 11).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        x = torch.rand(16, 3, 64, 64); y = torch.randint(0, 11, (16, 64, 64))
        def step():
            opt.zero_grad(set_to_none=True); F.cross_entropy(m(x)["out"], y).backward(); opt.step()
        for _ in range(3): step()
        rates = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(10): step()
            rates.append(160 / (time.perf_counter() - t))
        rates.sort()
        print(v["widths"], v.get("heads"), name, f"median {rates[2]:.0f} best {rates[-1]:.0f}", sum(p.numel() for p in m.parameters()), flush=True)
        if prof:
            from torch.profiler import profile
            with profile() as p:
                for _ in range(5): step()
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
