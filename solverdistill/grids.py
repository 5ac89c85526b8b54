"""Time grids: strictly decreasing float64 sigmas from sigma_max to sigma_min (docs/conventions.md "Time grids")."""

from __future__ import annotations

import math

import torch

from .errors import BadInput

TAU_MIN = 1e-3  # VP diffusion time at sigma_min for `time_uniform` (and DEIS's tau mapping)
SCHEDULES = ("polynomial", "logsnr", "time_uniform")
DEFAULT_RHO = {"polynomial": 7.0, "time_uniform": 1.0}


def polynomial(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid: uniform in sigma^(1/rho)."""
    i = torch.arange(n + 1, dtype=torch.float64) / n
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _pin_ends((hi + i * (lo - hi)) ** rho, sigma_min, sigma_max)


def logsnr(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log sigma (= uniform in log-SNR)."""
    i = torch.arange(n + 1, dtype=torch.float64) / n
    return _pin_ends(
        torch.exp(math.log(sigma_max) + i * (math.log(sigma_min) - math.log(sigma_max))), sigma_min, sigma_max
    )


class VPTime:
    """The VP-SDE time tau in [TAU_MIN, 1] whose sigma(tau) = sqrt(exp(beta_d tau^2/2 + beta_min tau) - 1)
    hits sigma_min at TAU_MIN and sigma_max at 1 (used by `time_uniform` grids and DEIS)."""

    def __init__(self, sigma_min: float, sigma_max: float, tau_min: float = TAU_MIN) -> None:
        # log(1 + sigma^2) = beta_d tau^2 / 2 + beta_min tau: two linear equations in (beta_d, beta_min).
        g0, g1 = math.log1p(sigma_min**2), math.log1p(sigma_max**2)
        e = tau_min
        self.beta_d = 2 * (g1 * e - g0) / (e - e * e)
        self.beta_min = g1 - self.beta_d / 2
        self.tau_min = tau_min

    def sigma(self, tau: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * tau**2 + self.beta_min * tau))

    def dsigma_dtau(self, tau: torch.Tensor) -> torch.Tensor:
        s = self.sigma(tau)
        return (self.beta_d * tau + self.beta_min) * (1 + s**2) / (2 * s)

    def tau(self, sigma: torch.Tensor) -> torch.Tensor:
        g = torch.log1p(sigma.to(torch.float64) ** 2)
        b, a = self.beta_min, 0.5 * self.beta_d
        return (-b + torch.sqrt(b * b + 4 * a * g)) / (2 * a) if a != 0 else g / b


def time_uniform(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Uniform in tau^(1/rho) of the VP time (rho 2 is DEIS's "time quadratic")."""
    vp = VPTime(sigma_min, sigma_max)
    i = torch.arange(n + 1, dtype=torch.float64) / n
    tau = (1 + i * (TAU_MIN ** (1 / rho) - 1)) ** rho
    return _pin_ends(vp.sigma(tau), sigma_min, sigma_max)


def _pin_ends(s: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    s = s.clone()
    s[0], s[-1] = sigma_max, sigma_min
    return s


def parse_schedule(text: str) -> tuple[str, float | None] | list[float]:
    """`name`, `name:rho`, or an explicit comma-separated list of sigmas."""
    text = text.strip()
    if "," in text:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise BadInput(f"--schedule: an explicit grid must be numbers separated by commas, got {text!r}") from None
        validate_explicit(values, "--schedule")
        return values
    name, _, arg = text.partition(":")
    if name not in SCHEDULES:
        raise BadInput(
            f"--schedule: unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}, "
            "name:rho, or a comma-separated list of sigmas"
        )
    if not arg:
        return name, None
    if name == "logsnr":
        raise BadInput("--schedule: logsnr takes no parameter")
    try:
        rho = float(arg)
    except ValueError:
        raise BadInput(f"--schedule: rho must be a number, got {arg!r}") from None
    if not rho > 0 or not math.isfinite(rho):
        raise BadInput(f"--schedule: rho must be > 0, got {arg}")
    return name, rho


def validate_explicit(values: list[float], where: str) -> None:
    if len(values) < 2:
        raise BadInput(f"{where}: an explicit grid needs at least 2 sigmas")
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        raise BadInput(f"{where}: every sigma must be a finite number > 0")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise BadInput(f"{where}: sigmas must be strictly decreasing (sigma_max first)")


def make_grid(schedule: str | tuple | list, steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Build a grid of `steps` intervals (steps + 1 sigmas) from a schedule spec."""
    spec = parse_schedule(schedule) if isinstance(schedule, str) else schedule
    if isinstance(spec, list):
        if len(spec) != steps + 1:
            raise BadInput(
                f"--schedule: this solver and NFE need {steps + 1} sigmas, the explicit grid has {len(spec)}"
            )
        return torch.tensor(spec, dtype=torch.float64)
    if steps < 1:
        raise BadInput(f"a grid needs at least 1 step, got {steps}")
    name, rho = spec
    if name == "polynomial":
        return polynomial(steps, sigma_min, sigma_max, rho or DEFAULT_RHO["polynomial"])
    if name == "logsnr":
        return logsnr(steps, sigma_min, sigma_max)
    return time_uniform(steps, sigma_min, sigma_max, rho or DEFAULT_RHO["time_uniform"])
