"""The toy:unet-gmm benchmark: the network's quality (denoising error against the exact gmm:cifar denoiser
across sigma, exact pixel FD of its samples), then held-out endpoint RMSE against its own accurate teacher for
handcrafted solvers, D-ODE, DLMS (bottleneck features), SFD (one network per NFE) and SFD-v (one network).
Usage: python benchmarks/toy_table.py [OUT.md] [--quick]"""

import sys
import time
from dataclasses import replace

import numpy as np
import torch

from solverdistill import students
from solverdistill.commands.distill import ensure_cache
from solverdistill.fid import FeatureStats, frechet_distance
from solverdistill.models import resolve
from solverdistill.progress import Bar
from solverdistill.recipes import load_recipe
from solverdistill.sampling import generate, plan
from solverdistill.students.common import handcrafted_baselines, heldout_rmse, split

out_path = next((a for a in sys.argv[1:] if not a.startswith("--")), "out/toy_table.md")
quick = "--quick" in sys.argv
lines = []


def say(text=""):
    print(text, flush=True)
    lines.append(text)


toy, gmm = resolve("toy:unet-gmm"), resolve("gmm:cifar")
g = torch.Generator().manual_seed(123)
say("## toy:unet-gmm against the exact gmm:cifar denoiser")
say("")
say("| sigma | " + " | ".join(f"{s:g}" for s in (0.002, 0.01, 0.05, 0.2, 0.5, 1, 2, 5, 20, 80)) + " |")
say("|---|" + "---|" * 10)
x0 = gmm.sample_data(256, g).float()
row = []
for s in (0.002, 0.01, 0.05, 0.2, 0.5, 1, 2, 5, 20, 80):
    x = x0 + s * torch.randn(x0.shape, generator=g)
    sig = torch.full((256,), float(s))
    with torch.no_grad():
        row.append((toy(x, sig) - gmm(x, sig)).pow(2).mean().sqrt().item())
say("| RMSE vs exact D | " + " | ".join(f"{v:.4f}" for v in row) + " |")
n_fd = 500 if quick else 2000
p = plan("heun", 36, toy.sigma_min, toy.sigma_max)
with torch.no_grad():
    xs = generate(toy, lambda m, x, c, cb: p.solve(m, x, c, cb), list(range(2_000_000, 2_000_000 + n_fd)), batch=250).x
    xg = generate(gmm, lambda m, x, c, cb: p.solve(m, x, c, cb), list(range(2_000_000, 2_000_000 + n_fd)), batch=250).x
exact = (gmm.data_mean().numpy(), gmm.data_cov().numpy())
fds = []
for x in (xs, xg, gmm.sample_data(n_fd, torch.Generator().manual_seed(7)).float()):
    st = FeatureStats()
    st.update(x.flatten(1))
    fds.append(frechet_distance(st.mean(), st.cov(), *exact))
say("")
say(f"Exact pixel FD to the mixture ({n_fd} samples, heun NFE 36): toy network {fds[0]:.2f}; the exact denoiser "
    f"with the same solver {fds[1]:.2f}; exact mixture samples {fds[2]:.2f} (the finite-sample floor).")

recipe = load_recipe("recipes/toy_sfd.yaml")
model = resolve(recipe.model.spec)
cache, _ = ensure_cache(recipe, model, print, lambda n, label: Bar(n, label, disabled=True))
_, held = split(cache, 0, 256)
say("")
say(f"## Held-out endpoint RMSE on toy:unet-gmm ({len(held)} seeds; teacher {cache.spec['solver']} {cache.steps} steps)")
say("")
nfes = [2, 3, 4, 5] if quick else list(range(2, 11))
best = {}
for nfe in nfes:
    base = handcrafted_baselines(model, cache, held, nfe)
    name = min(base, key=base.get)
    best[nfe] = (name, base[name])
dode = students.get("dode")
sfd = students.get("sfd")
dlms = students.get("dlms")
s_sfd, t_sfd = students.configs(sfd, recipe.student, recipe.train)
sfd_rows, times = {}, {}
for nfe in (2, 3, 4, 5):
    t0 = time.time()
    art = sfd.fit(cache, model, replace(s_sfd, nfe=nfe), t_sfd)
    times[nfe] = time.time() - t0
    sfd_rows[nfe] = heldout_rmse(sfd.load(art, model), model, cache, held)
rv = load_recipe("recipes/toy_sfdv.yaml")
s_v, t_v = students.configs(sfd, rv.student, rv.train)
t0 = time.time()
art_v = sfd.fit(cache, model, s_v, t_v)
time_v = time.time() - t0
sfdv_rows = {nfe: heldout_rmse(sfd.load(art_v, model, nfe=nfe), model, cache, held) for nfe in (2, 3, 4, 5)}
s_l, t_l = students.configs(dlms, {"method": "dlms", "nfe": 5}, {"iterations": 100 if quick else 200})
t0 = time.time()
art_l = dlms.fit(cache, model, s_l, t_l)
time_l = time.time() - t0
dlms5 = heldout_rmse(dlms.load(art_l, model), model, cache, held)
say("| NFE | best handcrafted | D-ODE (best base) | DLMS | SFD (per NFE) | SFD-v (one network) |")
say("|---|---|---|---|---|---|")
for nfe in nfes:
    d_best = min((heldout_rmse(dode.load(dode.fit(cache, model, *students.configs(
        dode, {"method": "dode", "nfe": nfe, "base": b}, {"heldout": 256})), model), model, cache, held), b)
        for b in ("euler", "ipndm", "dpm++3m", "unipc"))
    say(f"| {nfe} | {best[nfe][1]:.4f} ({best[nfe][0]}) | {d_best[0]:.4f} ({d_best[1]}) | "
        f"{f'{dlms5:.4f}' if nfe == 5 else '-'} | {f'{sfd_rows[nfe]:.4f}' if nfe in sfd_rows else '-'} | "
        f"{f'{sfdv_rows[nfe]:.4f}' if nfe in sfdv_rows else '-'} |")
say("")
say(f"Fine-tuning wall time (2-core CPU): SFD per NFE {', '.join(f'{n}: {t:.0f}s' for n, t in times.items())}; "
    f"SFD-v {time_v:.0f}s; DLMS (NFE 5) {time_l:.0f}s.")
with open(out_path, "w") as f:
    f.write("\n".join(lines) + "\n")
