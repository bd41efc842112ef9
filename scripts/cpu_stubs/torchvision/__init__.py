"""Import-only torchvision stand-in for the CPU test venv (scripts/setup_venv.sh).

The real torchvision wheel on PyPI drags in a CUDA torch, so the venv has none.
But sglang, vllm and transformers import torchvision at module level in their
multimodal code (``import torchvision.transforms as T``, ``from torchvision.io
import decode_image``, ``from torchvision.transforms import InterpolationMode``),
and transformers takes torchvision as present once it can find it.

So: every ``torchvision.*`` submodule imports, every attribute exists. The enums
that are used at import time (as dict keys, default arguments) are real enums;
anything else is a placeholder class that can be referenced and subclassed but
raises when called. Text-only models never call into it.
"""

import enum
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.28.0+cpustub"  # the torchvision that pairs with torch 2.13


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


_REAL = {"InterpolationMode": InterpolationMode, "ImageReadMode": ImageReadMode}


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision.{cls.__qualname__} is an import-only stub "
                           "(scripts/cpu_stubs): real torchvision is not installed")


_placeholders = {}


def _placeholder(qualname):
    if qualname not in _placeholders:
        cls = _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {})
        cls.__qualname__ = qualname
        _placeholders[qualname] = cls
    return _placeholders[qualname]


def _module_getattr(modname):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in _REAL:
            return _REAL[name]
        return _placeholder(f"{modname[len('torchvision.'):]}.{name}".lstrip("."))
    return __getattr__


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes any torchvision.<sub>[.<sub>...] importable as a stub package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module):
        module.__path__ = []
        module.__getattr__ = _module_getattr(module.__name__)


__getattr__ = _module_getattr("torchvision.")
__path__ = []  # submodules come only from _StubFinder
if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _StubFinder())
