"""Install dfqvit; the top-level ``kernels/`` folder is installed as ``dfqvit.kernels``.

The PyPI name ``kernels`` belongs to another project, so the folder is never an importable
top-level package (see ARCHITECTURE.md).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["dfqvit", "dfqvit.*"]) + ["dfqvit.kernels"]

setup(
    packages=packages,
    package_dir={"dfqvit.kernels": "kernels"},
)
