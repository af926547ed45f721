"""Warp kernels and device functions only (installed as ``diffmpm_cli.kernels``). No host logic, no torch."""
