"""Package discovery: every package under diffmpm_cli/, plus the folders installed inside it (pyproject.toml has the
rest of the metadata). kernels/ installs as diffmpm_cli.kernels, never as a top-level `kernels` (another project's
name on PyPI); configs/ and scenes/ (the example scenes, with their meshes and pictures) as package data."""

from setuptools import find_packages, setup

MAPPED = {"diffmpm_cli.kernels": "kernels", "diffmpm_cli.configs": "configs", "diffmpm_cli.scenes": "scenes",
          "diffmpm_cli.scenes.meshes": "scenes/meshes", "diffmpm_cli.scenes.images": "scenes/images"}

setup(packages=find_packages(include=["diffmpm_cli", "diffmpm_cli.*"]) + list(MAPPED), package_dir=MAPPED)
