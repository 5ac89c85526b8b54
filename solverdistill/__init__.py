"""solverdistill: fast few-step solvers for pretrained diffusion models."""

__version__ = "0.1.0"
