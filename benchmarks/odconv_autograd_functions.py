"""What ODConv's hand-written autograd Functions buy: a training step with each against the same step with autograd's
own backward in its place, the two taking turns on the same model in one process.

* ``_SamplesIntoChannels`` (``grouped`` on a channels_last input) against the permute-and-copy with autograd's
  permuted gradient: od_mobilenetv2_100, channels_last.
* ``_WindowsTimesGate`` (the im2col columns of ``gated_columns`` / ``stacked_columns``, the taps' gradients added in
  place) against autograd through the overlapping strided view: od_resnet18, NCHW.

    python benchmarks/odconv_autograd_functions.py
"""
import argparse
import datetime
from typing import Callable, Dict
from unittest import mock

import timm
import torch

from benchlib import RESULTS, describe_machine, interleaved_median_seconds, training_step
from zoo.layers import odconv_fast

CASES = (
    ('_SamplesIntoChannels', 'od_mobilenetv2_100', torch.channels_last, odconv_fast._SamplesIntoChannels,
     odconv_fast._samples_into_channels),
    ('_WindowsTimesGate', 'od_resnet18', torch.contiguous_format, odconv_fast._WindowsTimesGate,
     lambda padded, windows, gate: (windows * gate).contiguous()),
)


def _without(function: type, replacement: Callable, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with ``function.apply`` replaced by ``replacement`` while it runs."""
    def run() -> None:
        with mock.patch.object(function, 'apply', replacement):
            step()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [
        f'## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC — ODConv autograd Functions: a '
        f'training step with and without each',
        '',
        f'Machine: {describe_machine(torch.get_num_threads())}. `benchmarks/odconv_autograd_functions.py`: the same '
        f'model with the Function and with autograd\'s own backward in its place, taking turns; batch '
        f'{args.batch_size}, {args.img_size}x{args.img_size}, median of {args.repeats} runs after {args.warmup} '
        f'warm-up runs.',
        '',
        '| Function | model | memory format | with (ms) | without (ms) | without / with |',
        '|---|---|---|---:|---:|---:|',
    ]
    for name, model_name, memory_format, function, replacement in CASES:
        model = timm.create_model(model_name).train().to(memory_format=memory_format)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).to(memory_format=memory_format)
        step = training_step(model, x)
        steps: Dict[str, Callable[[], None]] = {'with': step, 'without': _without(function, replacement, step)}
        seconds = interleaved_median_seconds(steps, args.warmup, args.repeats)
        with_ms, without_ms = seconds['with'] * 1e3, seconds['without'] * 1e3
        print(f'{name:<22}{model_name:<20}with {with_ms:8.1f} ms  without {without_ms:8.1f} ms', flush=True)
        format_name = 'channels_last' if memory_format == torch.channels_last else 'NCHW'
        lines.append(f'| `{name}` | {model_name} | {format_name} | {with_ms:.1f} | {without_ms:.1f} | '
                     f'{without_ms / with_ms:.3f} |')
    with open(RESULTS, 'a', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n\n')


if __name__ == '__main__':
    main()
