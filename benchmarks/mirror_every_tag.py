"""``zoo mirror --dry-run`` over all 20 official tags at full size, and what each took, appended to RESULTS.md.

No official file can be downloaded here, so each tag's original is written the way its authors publish it, with
random values under every official key and shape (``tests/fixtures/official/official_state_dict_keys.json``): VAN's
transformers ``pytorch_model.bin``, ODConv's DDP training checkpoint, an EfficientMod Google Drive folder (a timm
training checkpoint with EMA weights beside the run's other files). The tests run the same command over the official
fixtures' real values, one tag per family; this script is the evidence for the other tags and their full sizes.

    python benchmarks/mirror_every_tag.py                        # all 20 tags
    python benchmarks/mirror_every_tag.py --tags 'od_resnet18*'
"""
import argparse
import fnmatch
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from zoo.mirror import mirror_tag, mirrored_tags
from zoo.models import MANIFEST_PATH, load_manifest

from benchlib import RESULTS, append_results, describe_machine, utc_heading

OFFICIAL_KEYS = Path(__file__).parent.parent / 'tests' / 'fixtures' / 'official' / 'official_state_dict_keys.json'
_VAN_REPOS = {'van_b0': 'van-tiny', 'van_b1': 'van-small', 'van_b2': 'van-base', 'van_b3': 'van-large'}
_EFFICIENTMOD = {'efficientmod_xxs': 'efficientMod_xxs', 'efficientmod_xs': 'efficientMod_xs',
                 'efficientmod_s': 'efficientMod_s', 'efficientmod_s_conv': 'efficientMod_s_Conv'}


def _random_state_dict(shapes: Dict[str, List[int]], seed: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith('num_batches_tracked'):
            out[key] = torch.tensor(1000)
        elif key.endswith('running_var'):
            out[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            out[key] = torch.randn(shape, generator=generator) * 0.02
    return out


def write_original(tag: str, folder: Path, keys: Dict[str, Dict[str, List[int]]]) -> None:
    """The tag's original as its authors publish it, with random values, into ``folder``."""
    model = tag.split('.')[0]
    folder.mkdir(parents=True)
    if model in _VAN_REPOS:
        torch.save(_random_state_dict(keys[f'transformers/{_VAN_REPOS[model]}'], 0), folder / 'pytorch_model.bin')
    elif model in _EFFICIENTMOD:
        weights = _random_state_dict(keys[f'efficientmod/{_EFFICIENTMOD[model]}'], 0)
        ema = {k: v * 0.9 if v.is_floating_point() else v for k, v in weights.items()}
        torch.save({'epoch': 299, 'state_dict': weights, 'state_dict_ema': ema, 'version': 2},
                   folder / 'model_best.pth.tar')
        (folder / 'args.yaml').write_text(f'model: {_EFFICIENTMOD[model]}\n')
        (folder / 'summary.csv').write_text('epoch,eval_top1\n')
    else:
        name = model[:-3] if model.endswith(('_4x', '_2x')) else model
        kernel_num = int(model[-2]) if model.endswith(('_4x', '_2x')) else 1
        weights = _random_state_dict(keys[f'odconv/{name}(kernel_num={kernel_num})'], 0)
        torch.save({'epoch': 100, 'state_dict': {f'module.{k}': v for k, v in weights.items()}, 'best_acc': 0.0},
                   folder / f'{model}.pth.tar')


def mirror_rows(pattern: str) -> List[str]:
    keys = json.loads(OFFICIAL_KEYS.read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = Path(shutil.copy(MANIFEST_PATH, work / 'weights_manifest.yaml'))
        for tag in fnmatch.filter(mirrored_tags(manifest), pattern):
            write_original(tag, work / 'originals' / tag, keys)
            start = time.perf_counter()
            try:
                done = mirror_tag(tag, work / 'originals', work / 'out', dry_run=True, manifest=manifest)
                folder_mb = sum(p.stat().st_size for p in done.folder.iterdir()) / 1e6
                row = (f'| {tag} | {done.original.name} | {done.size / 1e6:.1f} | {folder_mb:.1f} | '
                       f'{time.perf_counter() - start:.1f} | reloads exactly | {done.repo_id}: {done.status} |')
            except Exception as e:  # a row per tag, whatever happens to one
                row = f'| {tag} | | | | {time.perf_counter() - start:.1f} | FAILED: {type(e).__name__}: {e} | |'
            print(row, flush=True)
            rows.append(row)
            shutil.rmtree(work / 'originals' / tag, ignore_errors=True)
            shutil.rmtree(work / 'out' / tag, ignore_errors=True)
        recorded = sum(load_manifest(manifest)[t]['source']['sha256'] is not None for t in mirrored_tags(manifest))
        rows.append(f'\nsha256 and size recorded in the manifest copy for {recorded} tags.')
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tags', default='*', help='shell-style pattern of the tags to mirror')
    args = parser.parse_args()
    header = [
        utc_heading('zoo mirror --dry-run, every official tag at full size'),
        '', describe_machine(torch.get_num_threads()), '',
        'Originals written in the authors\' layouts with random values (benchmarks/mirror_every_tag.py); each one is '
        'checked, converted, written as a Hub folder, reloaded with local-dir: and compared on a fixed probe input '
        '(exact equality required).', '',
        '| tag | original | original (MB) | Hub folder (MB) | seconds | reload | mirror |',
        '|---|---|---:|---:|---:|---|---|',
    ]
    append_results(RESULTS, header + mirror_rows(args.tags))


if __name__ == '__main__':
    main()
