"""PEP 517 build backend: setuptools', with the CuTe headers (nvidia-cutlass) requested only for
builds that compile CUDA or emulator code.

nvidia-cutlass pulls cuda-python, cuda-bindings, scipy and more into every isolated build
environment, which a CPU-only build never reads; the CUDA decision (setup.py, ``cuda_choice``)
is known before the build environment is made, so the requirement follows it.
"""

import os
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the backend interface)

sys.path.insert(0, os.path.dirname(__file__))
from nattn_build_choice import cuda_choice, emu_requested  # noqa: E402

CUTLASS = "nvidia-cutlass==4.2.0.0"


def _extra():
    return [CUTLASS] if cuda_choice()[0] == "ON" or emu_requested() else []


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _extra()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _extra()
