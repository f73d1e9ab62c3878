"""timm-native model families; importing this package registers every entrypoint with timm."""
from typing import List

import timm

from .van import VAN

__all__ = ['FAMILY_MODULES', 'VAN', 'list_zoo_models']

# timm records a model's module as the last component of its Python module name
FAMILY_MODULES = ('van',)


def list_zoo_models(pattern: str = '*') -> List[str]:
    """Names of the timm models zoo registers, matching a shell-style ``pattern``."""
    return sorted(name for module in FAMILY_MODULES for name in timm.list_models(pattern, module=module))
