"""`sdistill export`: the diffusers scheduler reproduces `sdistill sample` in real diffusers pipelines, exported
sigmas reproduce our euler in EulerDiscreteScheduler, and what cannot be exported is refused (exit 2)."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from solverdistill import artifacts
from solverdistill.artifacts import Artifact, new_meta
from solverdistill.export import dlms_table, dode_table
from solverdistill.models import resolve
from solverdistill.solvers import plan
from solverdistill.solvers.multistep import TableSource, run_multistep
from solverdistill.students import dlms

diffusers = pytest.importorskip("diffusers")


def dlms_artifact(path, model, nfe=4, afs=True, designer="global", seed=0, order=3):
    """A DLMS artifact with a random (non-zero) rule: learned coefficients, grid and time scaling all move."""
    cfg = dlms.DLMSStudent(nfe=nfe, afs=afs, designer=designer, order=order)
    grid = dlms.initial_grid(cfg, model.sigma_min, model.sigma_max)
    student = dlms.DLMS(cfg, grid)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.designer.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    arrays = {f"designer.{k}": v.double().numpy() for k, v in student.designer.state_dict().items()}
    arrays["init_grid"] = grid.numpy()
    meta = new_meta(
        "dlms",
        base_solver="dlms[dpm++]",
        nfe=nfe,
        network_passes=nfe * model.passes_per_call,
        afs=afs,
        grid=grid.tolist(),
        student=asdict(cfg),
        model=model.spec,
        model_fingerprint=model.fingerprint,
    )
    return artifacts.save(Artifact(meta, arrays), path)


def dode_artifact(path, model, base="unipc", nfe=4, afs=False):
    """A D-ODE artifact over `base` with non-zero lambdas."""
    p = plan(base, nfe, model, afs=afs)
    lams = np.array([0.0] + [0.15 * (-1) ** k for k in range(1, nfe)])
    meta = new_meta(
        "dode",
        base_solver=p.info.name,
        nfe=nfe,
        network_passes=nfe * model.passes_per_call,
        afs=afs,
        grid=p.sigmas.tolist(),
        schedule=p.info.default_schedule,
        options={"lower_order_final": True},
        model=model.spec,
        model_fingerprint=model.fingerprint,
    )
    return artifacts.save(Artifact(meta, {"lambdas": lams, "grid": p.sigmas.numpy()}), path)


def ours(cli, art, spec, out, num=2):
    """`sdistill sample --solver ART` (seeds 0..num-1): the samples the scheduler must reproduce."""
    r = cli("sample", "--solver", art, "--model", spec, "--num", num, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    with np.load(out / "samples.npz") as f:
        return torch.from_numpy(f["x"]), torch.from_numpy(f["z"])


def exported(cli, art, tmp_path):
    from solverdistill.diffusers_scheduler import SolverDistillScheduler

    r = cli("export", art, "--to", "diffusers-scheduler", "--out", tmp_path / "sched")
    assert r.exit_code == 0, r.output
    assert "from_pretrained" in r.output
    return SolverDistillScheduler.from_pretrained(str(tmp_path / "sched"))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("afs", [True, False])
def test_dlms_global_table_samples_as_the_student(tmp_path, tiny64, noise, afs):
    path = dlms_artifact(tmp_path / "d.npz", tiny64, nfe=5, afs=afs)
    art = artifacts.load(path)
    student = dlms.load(art, tiny64)
    ex = dlms_table(art)
    assert len(set(ex.queries) - set(ex.sigmas[:-1])) > 0  # time scaling moved the query times
    x0 = noise(tiny64, 4)
    with torch.no_grad():
        want = student.solve(tiny64, x0)
        got = run_multistep(tiny64, x0, TableSource(ex.table, ex.sigmas, ex.queries), afs=afs)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()


def test_dode_table_is_the_base_table_with_its_lambdas(tmp_path, tiny64):
    art = artifacts.load(dode_artifact(tmp_path / "d.npz", tiny64, base="dpm++3m"))
    ex = dode_table(art)
    assert ex.lambdas == list(art.arrays["lambdas"]) and ex.queries == ex.sigmas[:-1]
    assert np.array_equal(
        ex.table.b, plan("dpm++3m", 4, tiny64).info.make_table(torch.tensor(ex.sigmas, dtype=torch.float64)).b
    )


def pixel_run(pipe_unet, sched, z, pipe=None):
    """DDPMPipeline itself (or `pipe`), with the final state read from the scheduler's last step (the pipeline
    decodes, clamps or rescales it afterwards)."""
    pipe = pipe or diffusers.DDPMPipeline(unet=pipe_unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    last = {}
    step = sched.step

    def spy(*args, **kwargs):
        res = step(*args, **kwargs)
        last["x"] = res.prev_sample
        return res

    sched.step = spy
    generators = [torch.Generator().manual_seed(s) for s in range(len(z))]
    pipe(batch_size=len(z), generator=generators, num_inference_steps=len(sched.timesteps), output_type="np")
    return last["x"]


@pytest.mark.parametrize("kind", ["dlms", "dode"])
def test_scheduler_reproduces_sample_in_ddpm_pipeline(kind, ddpm_dir, tmp_path, cli):
    spec = f"diffusers:{ddpm_dir}"
    model = resolve(spec)
    make = dlms_artifact if kind == "dlms" else dode_artifact
    art = make(tmp_path / f"{kind}.npz", model)
    want, z = ours(cli, art, spec, tmp_path / "s")
    sched = exported(cli, art, tmp_path)
    got = pixel_run(model.net, sched, z)
    # DDPMPipeline starts from z (it skips init_noise_sigma), i.e. sqrt(1 + sigma_max^2) z, not sigma_max z:
    # a relative 1 / (2 sigma_max^2) = 2e-5 at sigma_max 157.
    assert rel(got, want) < 1e-4, rel(got, want)


def test_a_distilled_global_dlms_exports_end_to_end(ddpm_dir, tmp_path, cli, recipe_file):
    """teacher -> distill (designer: global) -> export -> DDPMPipeline, as a user runs it."""
    spec = f"diffusers:{ddpm_dir}"
    recipe = recipe_file(
        tmp_path / "r.yaml",
        model=spec,
        teacher={"steps": 8, "num_samples": 12, "batch": 6, "shard_size": 6, "cache": str(tmp_path / "cache")},
        student={"method": "dlms", "nfe": 3, "designer": "global"},
        train={"iterations": 4, "batch": 4, "validation": 2, "heldout": 4, "eval_every": 2},
        output=tmp_path / "dlms.npz",
    )
    for args in (["teacher", recipe, "--quiet"], ["distill", recipe, "--quiet"]):
        r = cli(*args)
        assert r.exit_code == 0, r.output
    art = tmp_path / "dlms.npz"
    want, z = ours(cli, art, spec, tmp_path / "s")
    model = resolve(spec)
    got = pixel_run(model.net, exported(cli, art, tmp_path), z)
    assert rel(got, want) < 1e-4, rel(got, want)


@pytest.mark.parametrize("kind", ["dlms", "dode"])
def test_scheduler_reproduces_sample_in_a_latent_pipeline(kind, tmp_path, cli, ldm_dir):
    """LDMPipeline (a UNet2DModel over VQ latents): it scales its noise by init_noise_sigma and calls
    scale_model_input, so the start is ours exactly."""
    root = tmp_path / "ldm"
    ldm_dir(root)
    spec = f"diffusers:{root}"
    model = resolve(spec)
    art = (dlms_artifact if kind == "dlms" else dode_artifact)(tmp_path / f"{kind}.npz", model)
    want, z = ours(cli, art, spec, tmp_path / "s")
    sched = exported(cli, art, tmp_path)
    got = pixel_run(None, sched, z, diffusers.LDMPipeline(vqvae=model.autoencoder, unet=model.net, scheduler=sched))
    assert rel(got, want) < 1e-5, rel(got, want)


@pytest.fixture(scope="module")
def sd(tmp_path_factory, ddpm_scheduler):
    from test_diffusers_backend import build_sd

    root = tmp_path_factory.mktemp("sd_export")
    build_sd(root, ddpm_scheduler)
    return root


@pytest.mark.parametrize("kind,guidance", [("dlms", 7.5), ("dlms", 1.0), ("dode", 7.5), ("dode", 1.0)])
def test_scheduler_reproduces_sample_in_stable_diffusion(kind, guidance, sd, tmp_path, cli):
    spec = f"diffusers:{sd}?prompt=a cat&guidance={guidance}"
    model = resolve(spec)
    make = dlms_artifact if kind == "dlms" else dode_artifact
    art = make(tmp_path / f"{kind}.npz", model)
    want, z = ours(cli, art, spec, tmp_path / "s")
    sched = exported(cli, art, tmp_path)
    model.tokenizer.model_max_length = 77  # the pipeline pads to it; our backend pads to 77, as CLIP's tokenizer
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
    steps = len(sched.timesteps)
    got = pipe(
        ["a cat"] * len(z),
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=z,
        output_type="latent",
        height=16,
        width=16,
    ).images
    assert rel(got, want) < 1e-4, rel(got, want)


def test_scheduler_starts_img2img_at_strength_one_only(sd, tmp_path, cli):
    """StableDiffusionImg2ImgPipeline at strength 1 starts from `add_noise`: x0 + sigma_0 noise at the network's
    input scale, and then steps exactly as the text-to-image pipeline does from that start; a later start
    (strength < 1) is refused with a message saying why."""
    spec = f"diffusers:{sd}?prompt=a cat&guidance=7.5"
    model = resolve(spec)
    sched = exported(cli, dlms_artifact(tmp_path / "d.npz", model), tmp_path)
    model.tokenizer.model_max_length = 77
    parts = dict(vae=model.autoencoder, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.net)
    extra = dict(scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**parts, **extra)
    txt2img = diffusers.StableDiffusionPipeline(**parts, **extra)
    for p in (img2img, txt2img):
        p.set_progress_bar_config(disable=True)
    seen = {}
    add_noise = sched.add_noise

    def spy(x0, noise, t):
        seen["x0"], seen["noise"], seen["out"] = x0, noise, add_noise(x0, noise, t)
        return seen["out"]

    sched.add_noise = spy
    steps, image = len(sched.timesteps), torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    run = dict(num_inference_steps=steps, guidance_scale=7.5, output_type="latent")
    got = img2img(["a cat"] * 2, image=image, strength=1.0, generator=torch.Generator().manual_seed(1), **run).images
    sigma0, q0 = sched.config.sigmas[0], sched.config.queries[0]
    start = seen["x0"] + sigma0 * seen["noise"]
    assert torch.allclose(seen["out"], start / (q0**2 + 1) ** 0.5, rtol=0, atol=1e-6)
    assert seen["x0"].abs().max() > 0.1  # the image's latents are in the start, not only noise
    want = txt2img(["a cat"] * 2, latents=start / sigma0, height=16, width=16, **run).images  # x init_noise_sigma
    assert rel(got, want) < 1e-5, rel(got, want)
    with pytest.raises(ValueError, match="strength=1.0"):
        img2img(["a cat"] * 2, image=image, strength=0.5, **run)
    with pytest.raises(ValueError, match="strength=1.0"):
        sched.set_timesteps()
        sched.add_noise(seen["x0"], seen["noise"], sched.timesteps[1:2])


def test_exported_sigmas_reproduce_our_euler_in_euler_discrete(ddpm_dir, tmp_path, cli, ddpm_scheduler):
    spec = f"diffusers:{ddpm_dir}"
    model = resolve(spec)
    art = dlms_artifact(tmp_path / "d.npz", model, nfe=5)
    r = cli("export", art, "--to", "diffusers-sigmas")
    assert r.exit_code == 0, r.output
    assert "sigma_min" in r.output and "sigmas=sigmas" in r.output
    doc = json.loads((tmp_path / "d_sigmas.json").read_text())
    sigmas = doc["sigmas"]
    assert sigmas == dlms_table(artifacts.load(art)).sigmas and sigmas[-1] == pytest.approx(model.sigma_min)
    sched = diffusers.EulerDiscreteScheduler.from_config(ddpm_scheduler(), timestep_spacing="linspace")
    sched.set_timesteps(sigmas=sigmas)
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model.net(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        want = plan("euler", len(sigmas) - 1, model, ",".join(map(repr, sigmas))).solve(model, z * sigmas[0])
    assert rel(x, want) < 1e-4, rel(x, want)


def test_comfyui_sigmas_are_the_grid(tmp_path, tiny64, cli):
    art = dode_artifact(tmp_path / "d.yaml", tiny64, base="dpm++2m")
    r = cli("export", art, "--to", "comfyui", "--out", tmp_path / "c.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c.json").read_text()) == artifacts.load(art).arrays["grid"].tolist()
    assert "append 0" in r.output and "lambdas" in r.output


def test_what_cannot_be_exported_is_exit_2(tmp_path, tiny64, ddpm_dir, cli):
    spec = f"diffusers:{ddpm_dir}"
    model = resolve(spec)
    net = dlms_artifact(tmp_path / "n.npz", model, designer="network")
    for to in ("diffusers-scheduler", "diffusers-sigmas", "comfyui"):
        r = cli("export", net, "--to", to)
        assert r.exit_code == 2 and "designer: global" in r.output, r.output
    heun = dode_artifact(tmp_path / "h.npz", model, base="heun")
    r = cli("export", heun, "--to", "diffusers-scheduler")
    assert r.exit_code == 2 and "heun" in r.output and "multistep" in r.output, r.output
    gmm = dode_artifact(tmp_path / "g.npz", tiny64, base="euler")
    r = cli("export", gmm, "--to", "diffusers-scheduler")
    assert r.exit_code == 2 and "not a diffusers model" in r.output, r.output
    r = cli("export", gmm, "--to", "onnx")
    assert r.exit_code == 2 and "--to" in r.output and "comfyui" in r.output, r.output
    ok = dode_artifact(tmp_path / "ok.npz", model, base="euler")
    r = cli("export", ok, "--to", "diffusers-scheduler", "--model", f"{spec}?round_timesteps=1")
    assert r.exit_code == 2 and "fingerprint" in r.output and "--force" in r.output, r.output
    r = cli("export", ok, "--to", "diffusers-scheduler", "--model", f"{spec}?round_timesteps=1", "--force")
    assert r.exit_code == 0, r.output
    sfd = Artifact({**artifacts.load(gmm).meta, "method": "sfd"}, {"grid": np.array([80.0, 1.0, 0.002])})
    artifacts.save(sfd, tmp_path / "s.npz")
    r = cli("export", tmp_path / "s.npz", "--to", "diffusers-scheduler", "--model", spec, "--force")
    assert r.exit_code == 2 and "SFD" in r.output, r.output
