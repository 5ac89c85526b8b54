"""Teacher trajectories: accurate ODE solves from many seeds, cached on disk for every student to reuse."""

from .cache import TeacherCache

__all__ = ["TeacherCache"]
