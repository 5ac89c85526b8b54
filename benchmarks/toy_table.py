"""The toy:unet-gmm benchmark: the network's quality (denoising error against the exact gmm:cifar denoiser
across sigma, exact pixel FD of its samples), then held-out endpoint RMSE against its own accurate teacher for
handcrafted solvers, D-ODE, DLMS (bottleneck features), SFD (one network per NFE) and SFD-v (one network).
Usage: python benchmarks/toy_table.py [OUT.md] [--quick]"""

import sys
import time
from dataclasses import replace

import torch

from solverdistill import solvers, students
from solverdistill.evaluation import heldout_rmse, pixel_fd
from solverdistill.generate import generate
from solverdistill.models import resolve
from solverdistill.pipeline import open_workspace
from solverdistill.recipes import load_recipe

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
p = solvers.plan("heun", 36, toy)
xs = generate(toy, p, list(range(2_000_000, 2_000_000 + n_fd)), batch=250).x
xg = generate(gmm, p, list(range(2_000_000, 2_000_000 + n_fd)), batch=250).x
exact = (gmm.data_mean().numpy(), gmm.data_cov().numpy())
fds = [pixel_fd(x, exact) for x in (xs, xg, gmm.sample_data(n_fd, torch.Generator().manual_seed(7)).float())]
say("")
say(
    f"Exact pixel FD to the mixture ({n_fd} samples, heun NFE 36): toy network {fds[0]:.2f}; the exact denoiser "
    f"with the same solver {fds[1]:.2f}; exact mixture samples {fds[2]:.2f} (the finite-sample floor)."
)

# toy_sfd trains SFD online and caches only its held-out seeds; the cache-fitted students here need 768.
recipe = load_recipe("recipes/toy_sfd.yaml")
recipe = replace(recipe, teacher=replace(recipe.teacher, num_samples=768))
ws = open_workspace(recipe, "cpu")
model, cache = ws.model, ws.cache
_, held = cache.split(0, 256)
say("")
say(
    f"## Held-out endpoint RMSE on toy:unet-gmm ({len(held)} seeds; teacher {cache.spec['solver']} {cache.steps} steps)"
)
say("")
nfes = [2, 3, 4, 5] if quick else list(range(2, 11))
best = {}
for nfe in nfes:
    base = {name: heldout_rmse(p, model, cache, held) for name, p in solvers.sweep(nfe, model).items()}
    name = min(base, key=base.get)
    best[nfe] = (name, base[name])
dode = students.get("dode")
sfd = students.get("sfd")
dlms = students.get("dlms")
s_sfd, t_sfd = sfd.configs(recipe.student, {**recipe.train, "teacher": "cache"})  # online: sfd_table.py
sfd_rows, times = {}, {}
for nfe in (2, 3, 4, 5):
    t0 = time.time()
    art = sfd.fit(cache, model, replace(s_sfd, nfe=nfe), t_sfd)
    times[nfe] = time.time() - t0
    sfd_rows[nfe] = heldout_rmse(sfd.load(art, model), model, cache, held)
rv = load_recipe("recipes/toy_sfdv.yaml")
s_v, t_v = sfd.configs(rv.student, {**rv.train, "teacher": "cache"})
t0 = time.time()
art_v = sfd.fit(cache, model, s_v, t_v)
time_v = time.time() - t0
sfdv = sfd.load(art_v, model)
sfdv_rows = {nfe: heldout_rmse(sfdv.at_nfe(nfe), model, cache, held) for nfe in (2, 3, 4, 5)}
s_l, t_l = dlms.configs({"method": "dlms", "nfe": 5}, {"iterations": 100 if quick else 200})
t0 = time.time()
art_l = dlms.fit(cache, model, s_l, t_l)
time_l = time.time() - t0
dlms5 = heldout_rmse(dlms.load(art_l, model), model, cache, held)
say("| NFE | best handcrafted | D-ODE (best base) | DLMS | SFD (per NFE) | SFD-v (one network) |")
say("|---|---|---|---|---|---|")
for nfe in nfes:
    d_best = min(
        (
            heldout_rmse(
                dode.load(
                    dode.fit(cache, model, *dode.configs({"method": "dode", "nfe": nfe, "base": b}, {"heldout": 256})),
                    model,
                ),
                model,
                cache,
                held,
            ),
            b,
        )
        for b in ("euler", "ipndm", "dpm++3m", "unipc")
    )
    say(
        f"| {nfe} | {best[nfe][1]:.4f} ({best[nfe][0]}) | {d_best[0]:.4f} ({d_best[1]}) | "
        f"{f'{dlms5:.4f}' if nfe == 5 else '-'} | {f'{sfd_rows[nfe]:.4f}' if nfe in sfd_rows else '-'} | "
        f"{f'{sfdv_rows[nfe]:.4f}' if nfe in sfdv_rows else '-'} |"
    )
say("")
say(
    f"Fine-tuning wall time (2-core CPU): SFD per NFE {', '.join(f'{n}: {t:.0f}s' for n, t in times.items())}; "
    f"SFD-v {time_v:.0f}s; DLMS (NFE 5) {time_l:.0f}s."
)
with open(out_path, "w") as f:
    f.write("\n".join(lines) + "\n")
