"""The Hydra configs live in the top-level ``conf/`` (see docs/architecture.md) and are installed as ``fdistill.conf``,
so the command-line entry points find them after a plain ``pip install .`` as well as an editable install."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fdistill", "fdistill.*"]) + ["fdistill.conf"],
    package_dir={"fdistill.conf": "conf"},
)
