"""The ``zoo`` command: argument parsing and output only; the work is done by the library."""
import argparse
import sys
from typing import List, Optional

from zoo.hub import summarize_models

EXAMPLES = """examples:
  zoo list                 every model zoo registers with timm
  zoo list 'van_b[0-3]'    the VAN sizes with official weights
"""


def _list(args: argparse.Namespace) -> int:
    summaries = summarize_models(args.pattern)
    if not summaries:
        print(f'zoo: no model matches {args.pattern!r}; `zoo list` shows them all', file=sys.stderr)
        return 1
    print(f"{'model':<22}{'family':<20}{'params (M)':>11}  pretrained weights")
    for s in summaries:
        sources = [f'{tag} <- {where}' for tag, where in s.pretrained] or ['none (architecture only)']
        print(f'{s.name:<22}{s.family:<20}{s.params_m:>11.3f}  {sources[0]}')
        for source in sources[1:]:
            print(f"{'':<55}{source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='zoo', description='VAN, ODConv, EfficientMod and X-volution models for timm.',
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    list_cmd = commands.add_parser(
        'list', help='registered models, their size and where their weights come from',
        description='List the models zoo registers with timm: family, parameters, pretrained tags and their source.')
    list_cmd.add_argument('pattern', nargs='?', default='*', help="shell-style name filter, e.g. 'van_*'")
    list_cmd.set_defaults(run=_list)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == '__main__':
    sys.exit(main())
