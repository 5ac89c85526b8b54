"""How closely exported solvers reproduce `sdistill sample` in diffusers pipelines: the max relative difference of
the final states from the same noise, for DLMS (global designer) and D-ODE artifacts with random non-zero
parameters, on the tiny random pixel (DDPMPipeline) and Stable Diffusion (guidance 7.5 and 1) folders the tests
build, and exported sigmas in EulerDiscreteScheduler against our euler. Usage: python benchmarks/export_agreement.py
[NUM]"""

import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import diffusers  # noqa: E402
from conftest import DDPM_SCHEDULER, run_cli  # noqa: E402
from test_diffusers_backend import build_sd  # noqa: E402
from test_export import dlms_artifact, dode_artifact, ours, pixel_run, rel  # noqa: E402

from solverdistill.diffusers_scheduler import SolverDistillScheduler  # noqa: E402
from solverdistill.models import resolve  # noqa: E402
from solverdistill.solvers import plan  # noqa: E402

num = int(sys.argv[1]) if len(sys.argv) > 1 else 4
torch.set_num_threads(1)
root = Path(tempfile.mkdtemp(prefix="export_agreement_"))
print(
    f"{platform.node()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, diffusers "
    f"{diffusers.__version__}, float32, {num} seeds, NFE 4"
)


def scheduler(art, where):
    r = run_cli("export", art, "--to", "diffusers-scheduler", "--out", where)
    assert r.exit_code == 0, r.output
    return SolverDistillScheduler.from_pretrained(str(where))


torch.manual_seed(0)
pixel = root / "ddpm"
diffusers.UNet2DModel(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
).save_pretrained(pixel)
(pixel / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER))
sd = root / "sd"
sd.mkdir()
build_sd(sd, lambda **changes: {**DDPM_SCHEDULER, **changes})

for kind, make in (("dlms (global)", dlms_artifact), ("dode (unipc)", dode_artifact)):
    spec = f"diffusers:{pixel}"
    model = resolve(spec)
    work = root / f"pixel_{kind[:4]}"
    art = make(work / "a.npz", model)
    want, z = ours(run_cli, art, spec, work / "s", num=num)
    got = pixel_run(model.net, scheduler(art, work / "sched"), z)
    print(f"DDPMPipeline, {kind}: max relative difference {rel(got, want):.2e}")
    for guidance in (7.5, 1.0):
        spec = f"diffusers:{sd}?prompt=a cat&guidance={guidance}"
        model = resolve(spec)
        model.tokenizer.model_max_length = 77
        work = root / f"sd_{kind[:4]}_{guidance}"
        art = make(work / "a.npz", model)
        want, z = ours(run_cli, art, spec, work / "s", num=num)
        sched = scheduler(art, work / "sched")
        pipe = diffusers.StableDiffusionPipeline(
            vae=model.autoencoder,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.net,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        got = pipe(
            ["a cat"] * num,
            num_inference_steps=len(sched.timesteps),
            guidance_scale=guidance,
            latents=z,
            output_type="latent",
            height=16,
            width=16,
        ).images
        print(f"StableDiffusionPipeline guidance {guidance}, {kind}: max relative difference {rel(got, want):.2e}")

model = resolve(f"diffusers:{pixel}")
art = dlms_artifact(root / "grid.npz", model, nfe=5)
r = run_cli("export", art, "--to", "diffusers-sigmas", "--out", root / "sigmas.json")
sigmas = json.loads((root / "sigmas.json").read_text())["sigmas"]
euler = diffusers.EulerDiscreteScheduler.from_config(DDPM_SCHEDULER, timestep_spacing="linspace")
euler.set_timesteps(sigmas=sigmas)
z = torch.randn(num, 3, 16, 16, generator=torch.Generator().manual_seed(1))
x = z * euler.init_noise_sigma
with torch.no_grad():
    for t in euler.timesteps:
        x = euler.step(model.net(euler.scale_model_input(x, t), t).sample, t, x).prev_sample
    want = plan("euler", len(sigmas) - 1, model, ",".join(map(repr, sigmas))).solve(model, z * sigmas[0])
print(f"EulerDiscreteScheduler on exported sigmas vs our euler: max relative difference {rel(x, want):.2e}")
