"""diffmpm: differentiable MPM shape and material optimisation from the command line."""

__version__ = "0.1.0"
