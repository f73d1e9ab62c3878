"""The embedded default data set: scikit-learn's handwritten digits (1,797 8x8 scans from the UCI ML repository),
written out once as an ImageFolder of 32x32 PNGs, so ``zoo finetune`` runs with nothing to download."""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .data import DataError

__all__ = ['cache_root', 'digits_folder']

_SIZE = 32


def cache_root() -> Path:
    """Where the embedded data sets are written: ``$XDG_CACHE_HOME/zoo`` or ``~/.cache/zoo``."""
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'zoo'


def digits_folder(root: Path = None) -> Path:
    """The digits as ``ROOT/digits/{0..9}/NNNN.png`` (made on first use, in a temporary folder renamed into place).

    Raises:
        DataError: scikit-learn, which ships the digits, is not installed.
    """
    folder = (root or cache_root()) / 'digits'
    if folder.is_dir():
        return folder
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError('the embedded digits data set comes with scikit-learn: pip install scikit-learn, or '
                           'pass --data FOLDER') from e
    digits = load_digits()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='.digits.', dir=folder.parent))
    try:
        for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            gray = (pixels * (255 / 16)).astype(np.uint8)  # 17 grey levels, 0 = white paper
            image = Image.fromarray(255 - gray).resize((_SIZE, _SIZE), Image.Resampling.BILINEAR)
            (tmp / str(label)).mkdir(exist_ok=True)
            image.save(tmp / str(label) / f'{index:04d}.png')
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
