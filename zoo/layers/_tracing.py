"""Whether a graph is being captured, for operators whose eager form adapts to the input's size."""
import torch

__all__ = ['is_compiling', 'is_exporting']


def is_compiling() -> bool:
    """True under torch.compile, torch.export (so ONNX export) and torch.jit.trace, where one graph must serve
    every batch size."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def is_exporting() -> bool:
    """True under torch.export (so ONNX export) and torch.jit.trace (so legacy ONNX export): the captured graph is
    run later at other batch sizes, with no guard that would capture it again."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_exporting() or torch.jit.is_tracing()
