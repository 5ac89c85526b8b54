"""`SolverDistillScheduler`: a distilled (or handcrafted) multistep solver as a diffusers scheduler (docs/export.md).

It carries a coefficient table (`multistep.Table`), the grid, the times the network is asked at, AFS and D-ODE's
lambdas, plus the model's VP table for sigma -> timestep, all as plain numbers in its config, so
`save_pretrained` / `from_pretrained` work like any scheduler's. Each `step` feeds one network output to the
stepping core's `Stepper` (solvers/multistep.py) through a `TableSource`: the same update `sdistill sample` runs.

Coordinates. Our state is x = x0 + sigma eps (docs/conventions.md). Between steps the pipeline holds what the
network is fed next, x_i / sqrt(q_i^2 + 1) at the query sigma q_i, so `scale_model_input` is the identity and
pipelines that skip it (DDPMPipeline) work too; `init_noise_sigma` = sigma_0 / sqrt(q_0^2 + 1) makes the
pipeline's starting latents sigma_0 z, our start. The last step returns x_N at sigma_min itself, as `sample` does.
With AFS the pipeline still runs the network at the first timestep; the scheduler ignores that output.
img2img pipelines may use it at strength 1 (`add_noise` at the first timestep); a later start is refused, as the
learned steps need the outputs of the steps before them.

Importing this module imports diffusers (the optional extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging

from .models.diffusers_models import denoised_from, table_log_sigmas, timestep_of
from .solvers.base import afs_denoised
from .solvers.multistep import Stepper, Table, TableSource
from .students.dode import Extrapolated

logger = logging.get_logger(__name__)


@dataclass
class SolverDistillSchedulerOutput(BaseOutput):
    """`prev_sample`: what the network is fed next (the final state after the last step);
    `pred_original_sample`: the step's data prediction D."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class SolverDistillScheduler(SchedulerMixin, ConfigMixin):
    """A fixed multistep solver exported by `sdistill export --to diffusers-scheduler`."""

    order = 1

    @register_to_config
    def __init__(
        self,
        sigmas: list[float],
        queries: list[float],
        a: list[float],
        b: list[list[float]],
        c: list[list[float]],
        corrector: Optional[list[list[float]]] = None,
        afs: bool = False,
        lambdas: Optional[list[float]] = None,
        solver: str = "",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[list[float]] = None,
        prediction_type: str = "epsilon",
        round_timesteps: bool = False,
    ) -> None:
        steps = len(a)
        if len(sigmas) != steps + 1 or len(queries) != steps or len(b) != steps or len(c) != steps:
            raise ValueError(f"SolverDistillScheduler: {steps} steps need {steps + 1} sigmas and {steps} queries")
        self.table = Table(
            np.asarray(a, dtype=np.float64),
            np.asarray(b, dtype=np.float64).reshape(steps, -1),
            np.asarray(c, dtype=np.float64).reshape(steps, -1),
            None if corrector is None else np.asarray(corrector, dtype=np.float64).reshape(steps, -1),
        )
        vp = {
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "beta_schedule": beta_schedule,
            "trained_betas": trained_betas,
        }
        t = timestep_of(torch.tensor(queries, dtype=torch.float64), table_log_sigmas(vp), round_timesteps)
        self.timesteps = t.to(torch.float32)
        self.sigmas = torch.tensor(sigmas, dtype=torch.float64)
        self.num_inference_steps = steps
        self.init_noise_sigma = sigmas[0] / math.sqrt(queries[0] ** 2 + 1)
        self.set_timesteps()

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Any = None, **kwargs: Any) -> None:
        """Start a new trajectory. The exported solver fixes the steps: any other count is ignored (with a
        warning), and custom timesteps or sigmas are refused."""
        if kwargs.get("timesteps") is not None or kwargs.get("sigmas") is not None:
            raise ValueError("SolverDistillScheduler: the exported solver fixes its grid; drop timesteps= / sigmas=")
        if num_inference_steps is not None and num_inference_steps != self.num_inference_steps:
            logger.warning(
                f"SolverDistillScheduler: this solver takes {self.num_inference_steps} steps; "
                f"num_inference_steps={num_inference_steps} is ignored"
            )
        if device is not None:
            self.timesteps = self.timesteps.to(device)
        cfg = self.config
        self.source = TableSource(self.table, cfg.sigmas, cfg.queries)
        self.stepper = Stepper(self.source)
        self.extrapolated = Extrapolated(lambda x, sigma, cond: self._raw, cfg.lambdas or [])  # D-ODE (0 = base solver)
        self._step_index = 0

    @property
    def step_index(self) -> int:
        return self._step_index

    START_ONLY = (
        "SolverDistillScheduler: the exported solver starts only at its first step (img2img: strength=1.0), and "
        "add_noise works only there (pipelines that re-noise at later steps, such as inpainting, are not supported); "
        "each step combines the network outputs of the steps before it, which a later start would not have"
    )

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where an img2img pipeline starts; `strength` below 1 asks for a later step, which this solver refuses."""
        if begin_index != 0:
            raise ValueError(f"{self.START_ONLY}; got begin index {begin_index}")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """img2img's start at the first timestep: x0 + sigma_0 noise, as the network's input there (the state the
        pipeline holds between steps)."""
        t = torch.as_tensor(timesteps, dtype=self.timesteps.dtype).flatten().to(self.timesteps.device)
        if not bool((t == self.timesteps[0]).all()):
            raise ValueError(f"{self.START_ONLY}; got timesteps {t.tolist()}, the first is {float(self.timesteps[0])}")
        return (original_samples + self.config.sigmas[0] * noise) / self._scale(0)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The identity: the sample between steps is already the network's input."""
        return sample

    def _scale(self, i: int) -> float:
        return math.sqrt(self.config.queries[i] ** 2 + 1)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SolverDistillSchedulerOutput | tuple:
        """One step of the stored solver from the network output at the current step's timestep."""
        i, cfg = self._step_index, self.config
        if i >= self.num_inference_steps:
            raise ValueError("SolverDistillScheduler: all steps are taken; call set_timesteps to start again")
        x = sample * self._scale(i)  # our state at sigma_i (docs/conventions.md)
        called = not (cfg.afs and i == 0)
        if called:
            q = torch.tensor(cfg.queries[i], dtype=torch.float32, device=x.device)
            self._raw = denoised_from(model_output.to(torch.float32), x.to(torch.float32), q, cfg.prediction_type)
            denoised = self.extrapolated(x, None, None).to(x.dtype)
        else:  # analytical first step: the pipeline's network output is not used
            denoised = afs_denoised(x, cfg.sigmas[0])
        x_next, _ = self.stepper.step(i, x, denoised, called)
        self._step_index += 1
        prev = x_next if self._step_index == self.num_inference_steps else x_next / self._scale(self._step_index)
        if not return_dict:
            return (prev, denoised)
        return SolverDistillSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)
