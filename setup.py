"""Build script: the package is pure Python; csrc/ operators are added by the kernels work (issue 4)."""
from setuptools import setup

setup()
