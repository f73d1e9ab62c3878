"""``python -m zoo.finetune ARGS`` is ``zoo finetune ARGS``, the form torchrun starts:
``torchrun ... -m zoo.finetune ARGS``."""
import sys

from zoo.cli import main

sys.exit(main(['finetune', *sys.argv[1:]]))
