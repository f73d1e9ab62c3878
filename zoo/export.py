"""Deployment: a model (a tag, a Hub or local folder, or any checkpoint zoo reads) as an ONNX file, exported with
PyTorch's exporter, checked with onnx's checker and compared with PyTorch through onnxruntime before the file is moved
into place. The onnx extra (``pip install "zoo-timm[onnx]"``) provides onnx, onnxscript and onnxruntime."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from timm.utils import reparameterize_model
from torch import nn

from zoo._files import atomic_write
from zoo.errors import ZooError

__all__ = ['ExportError', 'OnnxExport', 'export_onnx']

PathLike = Union[str, Path]


class ExportError(ZooError, ValueError):
    """An export that cannot be written or does not match PyTorch."""


@dataclass
class OnnxExport:
    """An exported file and how it was checked: onnxruntime's outputs against PyTorch's at ``checked_batch``."""
    path: Path
    input_size: tuple
    dynamic_batch: bool
    checked_batch: int
    max_abs_diff: float
    bytes: int


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError('ONNX export needs onnx, onnxscript and onnxruntime: pip install "zoo-timm[onnx]"') from e
    return onnx, onnxruntime


def export_onnx(model: nn.Module, out: PathLike, input_size: Optional[tuple] = None, reparameterize: bool = False,
                dynamic_batch: bool = True, tolerance: float = 1e-4) -> OnnxExport:
    """Write ``model`` (eval mode) to the ONNX file ``out`` and check it.

    Args:
        model: The model to export (any nn.Module; a timm model gives its input size from its pretrained cfg).
        out: The ONNX file to write; written beside it and renamed into place once checked.
        input_size: (C, H, W) of the exported input; the pretrained cfg's if None.
        reparameterize: Export the deploy form (``timm.utils.reparameterize_model``).
        dynamic_batch: Leave the batch dimension free; the file is then checked at another batch size than the
            one exported with.
        tolerance: Largest max-abs difference between onnxruntime's and PyTorch's outputs.
    Raises:
        ExportError: missing onnx packages, an unwritable destination, or outputs that differ by more than
        ``tolerance``.
    """
    onnx, onnxruntime = _onnx_modules()
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportError(f'{out.parent}: no such folder to write {out.name} into')
    input_size = tuple(input_size or model.pretrained_cfg['input_size'])
    model = reparameterize_model(model.eval()) if reparameterize else model.eval()
    # torch.export fixes a dimension of size 1, so a free batch is exported at 2 and checked at 3
    export_batch, check_batch = (2, 3) if dynamic_batch else (1, 1)
    example = torch.randn(export_batch, *input_size, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = ({0: torch.export.Dim('batch')},) if dynamic_batch else None
    x = torch.randn(check_batch, *input_size, generator=torch.Generator().manual_seed(1))
    diffs = []

    def write_and_check(tmp: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(model, (example,), str(tmp), dynamo=True, dynamic_shapes=dynamic_shapes,
                              verbose=False, external_data=False)
        onnx.checker.check_model(str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=['CPUExecutionProvider'])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            diffs.append((torch.from_numpy(got) - model(x)).abs().max().item())
        if not diffs[0] <= tolerance:
            raise ExportError(f'{out}: onnxruntime differs from PyTorch by {diffs[0]:.3g} (max abs, more than '
                              f'{tolerance:g}); nothing was written')
    atomic_write(out, write_and_check)
    return OnnxExport(out, input_size, dynamic_batch, check_batch, diffs[0], out.stat().st_size)
