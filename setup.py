"""Only the package list lives here: the CUDA sources in the top-level kernels/ ship inside the
wheel as the data package ``spmd._kernels`` (pyproject.toml cannot add a mapped package to a
``find`` result).  Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["spmd*"]) + ["spmd._kernels"],
      package_dir={"spmd._kernels": "kernels"})
