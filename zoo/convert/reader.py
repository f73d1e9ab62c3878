"""Reading checkpoint files without ever executing code from them.

safetensors files are recognised by their header, whatever their name. Everything else goes through
``torch.load(weights_only=True)`` with exactly one extra global allowed: ``argparse.Namespace``, which timm-style
training checkpoints (VAN, EfficientMod) keep their ``args`` in. A pickle that asks for anything else is refused.
"""
import argparse
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Union

import torch
from safetensors.torch import load_file

__all__ = ['CheckpointError', 'read_checkpoint', 'SAFE_GLOBALS']

# globals a real training checkpoint may hold beside its tensors, and that are harmless to construct
SAFE_GLOBALS = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or not of the expected model."""


def _is_safetensors(path: Path) -> bool:
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    header_len = struct.unpack('<Q', head[:8])[0]
    return head[8:9] == b'{' and 0 < header_len < path.stat().st_size


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device='cpu')
    except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
        raise CheckpointError(f'{path}: damaged safetensors file ({e}); download or export it again') from e


def _unsafe_globals(path: Path, error: Exception) -> List[str]:
    """The globals a refused pickle asked for ([] when the refusal was about something else, e.g. damage)."""
    if zipfile.is_zipfile(path):
        try:
            return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # a damaged archive: the load error says more than this would
            return []
    return re.findall(r'GLOBAL ([\w.]+)', str(error))


def _read_pickle(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # torch.load reports damage with many exception types, refusals with UnpicklingError
        unsafe = _unsafe_globals(path, e) if isinstance(e, pickle.UnpicklingError) else []
        if unsafe:
            raise CheckpointError(
                f'{path}: refused to unpickle: it needs {", ".join(unsafe)}, which a weights-only checkpoint never '
                f'contains. If you trust its origin, load it in your own code and save its state dict with '
                f'safetensors') from e
        reason = str(e).split('. ')[0].strip()  # torch appends paragraphs of advice that do not apply here
        raise CheckpointError(
            f'{path}: not a readable PyTorch or safetensors checkpoint (truncated or damaged?): {reason}') from e


def read_checkpoint(path: Union[str, Path]) -> Any:
    """The object stored in a checkpoint file: a state dict, or a training container holding one.

    Raises:
        CheckpointError: missing file, damaged or truncated file, or a pickle that needs non-allow-listed globals.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such checkpoint file')
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _read_pickle(path)
