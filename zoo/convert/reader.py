"""Reading checkpoint files without ever executing code from them.

safetensors files are recognised by their header, whatever their name. torch.save's archives and pickles go through
``torch.load(weights_only=True)`` with exactly one extra global allowed: ``argparse.Namespace``, which timm-style
training checkpoints (VAN, EfficientMod) keep their ``args`` in. A pickle that asks for anything else is refused, and
says what it would have run (read from its opcodes, never executed). Anything else (an empty file, text, another
format) is named for what it is.
"""
import argparse
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Union

import torch
from safetensors.torch import load_file

from zoo.errors import ZooError

__all__ = ['CheckpointError', 'read_checkpoint', 'SAFE_GLOBALS']

# globals a real training checkpoint may hold beside its tensors, and that are harmless to construct
SAFE_GLOBALS = (argparse.Namespace,)
# modules whose globals a pickle of weights may name (torch's tensor rebuilders, containers, the args Namespace)
_HARMLESS_MODULES = ('torch.', 'collections.OrderedDict', 'argparse.Namespace', '_codecs.encode', 'builtins.set')


class CheckpointError(ZooError, ValueError):
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


def _pickled_globals(path: Path) -> List[str]:
    """The globals (``module.name``) the pickles at the start of a file would import, read from their opcodes without
    running them: a bare pickle, or the four of a legacy (non-zip) ``torch.save`` file, whose raw storages follow."""
    found, strings = [], []
    with open(path, 'rb') as f:
        try:
            while True:  # each genops stops after one pickle's STOP
                for opcode, arg, _ in pickletools.genops(f):
                    if opcode.name == 'GLOBAL':
                        found.append(str(arg).replace(' ', '.'))
                    elif opcode.name == 'STACK_GLOBAL' and len(strings) >= 2:
                        found.append(f'{strings[-2]}.{strings[-1]}')
                    elif isinstance(arg, str):
                        strings.append(arg)
        except Exception:  # the end of the file, the storages' raw bytes or damage: what was read is what it asks for
            pass
    return found


def _unsafe(names: List[str]) -> List[str]:
    """The globals among ``names`` that no weights-only checkpoint needs (tensors, containers, argparse.Namespace)."""
    return sorted({n for n in names if not n.startswith(_HARMLESS_MODULES)})


def _refusal(path: Path, unsafe: List[str]) -> CheckpointError:
    return CheckpointError(
        f'{path}: refused: unpickling it would run code (it calls {", ".join(unsafe)}), which a checkpoint of weights '
        f'never needs. If you trust its origin, load it in your own code and save its state dict with safetensors')


def _unsafe_globals(path: Path) -> List[str]:
    """The globals a checkpoint that torch.load refused would import, read without running anything."""
    if not zipfile.is_zipfile(path):
        return _unsafe(_pickled_globals(path))
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a damaged archive: the load error says more
        return []


def _read_pickle(path: Path) -> Any:
    try:
        # weights_only: a global outside SAFE_GLOBALS is refused before anything runs
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # torch.load reports damage with many exception types, refusals with UnpicklingError
        unsafe = _unsafe_globals(path) if isinstance(e, pickle.UnpicklingError) else []
        if unsafe:
            raise _refusal(path, unsafe) from e
        reason = ' '.join(str(e).split('. ')[0].split()) or type(e).__name__  # torch appends advice that does not apply
        raise CheckpointError(f'{path}: a damaged or truncated PyTorch checkpoint ({reason}): download or save it '
                              f'again') from e


def _describe_other(path: Path, head: bytes) -> str:
    """What a file that is neither safetensors nor a pickle looks like, for the error."""
    try:
        text = head.decode('utf-8')
    except UnicodeDecodeError:
        return 'an unknown binary format'
    if text.isprintable() or all(c.isprintable() or c in '\r\n\t' for c in text):
        preview = ' '.join(text.split())[:40]
        return f'text ("{preview}...")'
    return 'an unknown format'


def read_checkpoint(path: Union[str, Path]) -> Any:
    """The object stored in a checkpoint file: a state dict, or a training container holding one.

    Raises:
        CheckpointError: missing file, damaged or truncated file, or a pickle that needs non-allow-listed globals.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f'{path} is a folder: give the checkpoint file in it (.pth, .pth.tar, .bin, '
                              f'.safetensors)')
    if not path.is_file():
        raise CheckpointError(f'{path}: no such checkpoint file')
    with open(path, 'rb') as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f'{path}: an empty file (0 bytes), not a checkpoint: download or save it again')
    if _is_safetensors(path):
        return _read_safetensors(path)
    if head[:4] == b'PK\x03\x04' or head[:1] == b'\x80':  # torch.save's zip archive (whole or cut), or a pickle
        return _read_pickle(path)
    raise CheckpointError(f'{path}: not a PyTorch or safetensors checkpoint: the file holds '
                          f'{_describe_other(path, head)}')
