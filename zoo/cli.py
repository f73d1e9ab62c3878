"""The ``zoo`` command: argument parsing and output only; the work is done by the library (``zoo.catalogue``,
``zoo.hub``, ``zoo.predict``, ``zoo.models``, ``zoo.finetune``).

A user error (a :class:`~zoo.errors.ZooError`: a bad name, file, image, data folder or recipe) ends in one line on
stderr and exit status 1. Any other exception is a bug in zoo: its traceback is shown, with where to report it, and
the exit status is 2.
"""
import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

from tqdm import tqdm

from zoo.errors import ZooError

EXAMPLES = """examples:
  zoo finetune                                       fine-tune on the embedded digits data set (CPU, minutes)
  zoo finetune --model van_b1 --data pets/ --config configs/van.yaml
  zoo evaluate local-dir:runs/van_b1-pets/best --data pets/
  zoo list 'van_b[0-3]'                              models and where their weights come from
  zoo info efficientmod_s.in1k                       architecture, preprocessing, feature maps, manifest entry
  zoo convert van_b0 van_tiny_754.pth.tar --out van_b0-in1k --verify
  zoo publish van_b0-in1k --repo-id me/van_b0.in1k --dry-run
  zoo mirror --download-to originals/ --out mirror/ --dry-run      (maintainers)
  zoo predict hf-hub:me/van_b0.in1k cat.jpg --top-k 3
"""


def _list(args: argparse.Namespace) -> int:
    from zoo.catalogue import summarize_models
    summaries = summarize_models(args.pattern)
    if not summaries:
        return _fail(f'no model matches {args.pattern!r}; `zoo list` shows them all')
    print(f"{'model':<24}{'family':<20}{'params (M)':>11}  pretrained weights (tag: where they are)")
    for s in summaries:
        print(f'{s.name:<24}{s.family:<20}{s.params_m:>11.3f}' + ('' if s.pretrained else '  none'))
        for tag, where in s.pretrained:
            line = f'    {tag}: {where}'
            print(line if len(line) <= 120 else f'    {tag}:\n        {where}')
    return 0


def _info(args: argparse.Namespace) -> int:
    from zoo.catalogue import model_info
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['model']}: {info['class']} ({info['family']}), {info['params_m']:.3f} M parameters, "
          f"{info['num_features']} features before the classifier")
    cfg = info['pretrained_cfg']
    print(f"pretrained cfg {cfg['architecture']}.{cfg.get('tag')}: input {tuple(cfg['input_size'])}, "
          f"{cfg['interpolation']}, crop_pct {cfg['crop_pct']}, mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])}")
    print('feature maps (features_only=True):')
    for i, f in enumerate(info['feature_info']):
        print(f"  {i}: {f['num_chs']} channels at stride {f['reduction']} ({f['module']})")
    entry = info['manifest']
    if entry:
        from zoo.models import weights_location
        accuracy = f"top-1 {entry['top1']} (reported)" if entry['top1'] is not None else 'no reported top-1'
        print(f"weights: {weights_location(info['model'] + '.' + cfg['tag'])}; {accuracy}; license {entry['license']}")
        if entry.get('note'):
            print(f"note: {entry['note']}")
    else:
        print('weights: none published for this tag')
    return 0


def _convert(args: argparse.Namespace) -> int:
    from zoo.hub import check_output_folder, export_hub_folder
    from zoo.models import create_model_from_checkpoint, resolve_model_name
    resolve_model_name(args.model)
    check_output_folder(args.out, args.force, args.checkpoint)  # before the slow part
    with _progress(2, 'convert') as steps:
        model = create_model_from_checkpoint(args.model, args.checkpoint, pretrained_use_ema=args.ema).eval()
        steps.update()
        report = export_hub_folder(model, args.out, source=args.checkpoint, use_ema=args.ema,
                                   repo_hint=args.repo_id or 'ORG/NAME', force=args.force, verify=args.verify,
                                   label_names=_label_names(args.label_names))
        steps.update()
    print(f'wrote {args.out} ({args.model}, {model.num_classes} classes, {"EMA" if args.ema else "plain"} weights)')
    if report:
        print(report)
    return 0


def _label_names(value: Optional[str]) -> Optional[List[str]]:
    """--label-names: a text file with one class name per line, or the names separated by commas."""
    if not value:
        return None
    path = Path(value)
    names = path.read_text(encoding='utf-8').splitlines() if path.is_file() else value.split(',')
    return [name.strip() for name in names if name.strip()]


def _publish(args: argparse.Namespace) -> int:
    from zoo.hub import publish_hub_folder
    url, files = publish_hub_folder(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run)
    if args.dry_run:
        print(f'{args.folder} is a valid zoo export; would upload to {url}{" (private)" if args.private else ""}:')
        for name, size in files:
            print(f'  {name}  {size / 1e6:.2f} MB')
    else:
        print(f'uploaded {args.folder} to {url}')
    return 0


def _mirror(args: argparse.Namespace) -> int:
    from zoo.mirror import mirror_tags
    for done in mirror_tags(args.tags, args.out, originals=args.originals, download_to=args.download_to,
                            dry_run=args.dry_run, manifest=args.manifest):
        sha = f'sha256 {done.sha256[:12]}... ({"recorded" if done.recorded else "as recorded"})'
        action = {'published': f'published to {done.repo_id}', 'unchanged': f'{done.repo_id} has it already',
                  'dry run': f'would publish to {done.repo_id}'}[done.status]
        print(f'{done.tag}: {done.original.name}, {done.size / 1e6:.1f} MB, {sha}; reloads exactly from '
              f'{done.folder}; {action}')
    return 0


def _predict(args: argparse.Namespace) -> int:
    from zoo.predict import classify_images, load_image, load_model
    for path in args.images:  # every file is checked before any work
        load_image(path)
    model = load_model(args.model, args.checkpoint)
    with _progress(len(args.images), 'predict', unit='image') as bar:
        for path, prediction in zip(args.images, classify_images(model, args.images, top_k=args.top_k)):
            bar.update()
            print(path)
            for label, prob in prediction:
                print(f'  {prob:7.2%}  {label}')
    return 0


def _finetune(args: argparse.Namespace) -> int:
    import logging
    import os
    from zoo.finetune import RunFolder, finetune, recipe_for_run
    from zoo.finetune.recipe import Recipe
    flags = {name: getattr(args, name) for name in Recipe.__dataclass_fields__ if hasattr(args, name)}
    resumed = RunFolder(args.resume).recipe() if args.resume else None
    recipe = recipe_for_run(flags, args.config, resumed)
    main_process = os.environ.get('RANK', '0') == '0'
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    logging.getLogger('zoo').setLevel(logging.INFO if main_process else logging.ERROR)
    if recipe.task != 'classify':  # detection and segmentation
        return _finetune_dense(recipe, args, main_process)
    result = finetune(recipe, resume=args.resume, force=args.force)
    if main_process:
        minutes, seconds = divmod(round(result.seconds), 60)
        print(f'best validation top-1 {result.best.top1:.2f}% (top-5 {result.best.top5:.2f}%, {result.best.count} '
              f'images) at epoch {result.best_epoch}/{result.epochs_run}'
              f'{" (stopped early)" if result.stopped_early else ""}, {minutes}m{seconds:02d}s -> {result.folder}')
    return 0


def _finetune_dense(recipe: Any, args: argparse.Namespace, main_process: bool) -> int:
    from zoo.finetune.dense_trainer import finetune_dense
    result = finetune_dense(recipe, resume=args.resume, force=args.force)
    if main_process:
        minutes, seconds = divmod(round(result.seconds), 60)
        metrics = ', '.join(f'{name} {value:.3f}' for name, value in result.best.items())
        print(f'best validation {metrics} at epoch {result.best_epoch}/{result.epochs_run}'
              f'{" (stopped early)" if result.stopped_early else ""}, {minutes}m{seconds:02d}s -> {result.folder}')
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from zoo.finetune import read_image_folder
    from zoo.finetune.evaluate import confusion_rows, evaluate_folder
    from zoo.predict import load_model
    folder = read_image_folder(args.data, val_fraction=None, workers=args.workers)  # checked before the model loads
    model = load_model(args.model, args.checkpoint)
    evaluation = evaluate_folder(model, folder, batch_size=args.batch_size, workers=args.workers)
    classes = folder.classes
    print(f'{args.model} on {args.data}: top-1 {evaluation.top1:.2f}%, top-5 {evaluation.top5:.2f}%, loss '
          f'{evaluation.loss:.4f} ({evaluation.count} images, {len(classes)} classes)')
    if len(classes) <= 20:
        print('confusion matrix (rows: true class, columns: predicted):')
        for line in confusion_rows(evaluation, classes):
            print(f'  {line}')
    return 0


def _export(args: argparse.Namespace) -> int:
    from zoo.export import export_onnx
    from zoo.predict import load_model
    model = load_model(args.model, args.checkpoint)
    input_size = (model.pretrained_cfg['input_size'][0], args.img_size, args.img_size) if args.img_size else None
    result = export_onnx(model, args.out, input_size=input_size, reparameterize=args.reparam,
                         dynamic_batch=args.dynamic_batch)
    batch = 'a free batch dimension' if result.dynamic_batch else 'batch 1'
    print(f'wrote {result.path} ({result.bytes / 1e6:.1f} MB, input {result.input_size} with {batch}'
          f'{", reparameterized" if args.reparam else ""}); onnxruntime matches PyTorch at batch '
          f'{result.checked_batch} to {result.max_abs_diff:.1e}')
    return 0


def _recipe_flags(sub: argparse.ArgumentParser) -> None:
    """One flag per recipe setting (``--batch-size`` for ``batch_size``); only those given override."""
    from typing import get_args
    from zoo.finetune.recipe import Recipe
    for field in Recipe.__dataclass_fields__.values():
        flag, help_text = '--' + field.name.replace('_', '-'), f"{field.metadata['help']} (default {field.default})"
        kinds = [k for k in get_args(field.type) if k is not type(None)] or [field.type]
        if kinds[0] is bool:
            sub.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif field.name == 'scale':
            sub.add_argument(flag, nargs=2, type=float, metavar=('MIN', 'MAX'), default=argparse.SUPPRESS,
                             help=help_text)
        else:
            kind = kinds[0] if kinds[0] in (int, float) else str
            sub.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=field.name.upper(), help=help_text)


def _progress(total: int, desc: str, unit: str = 'step') -> tqdm:
    """A progress bar on stderr, shown only on a terminal (pipes and logs get the results alone)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text} is not a positive number')
    return value


def _version() -> str:
    from zoo import __version__
    return __version__


def _fail(message: str) -> int:
    print(f'zoo: {message}', file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='zoo', description='VAN, ODConv, EfficientMod and X-volution models for timm.',
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=f'zoo {_version()}')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def command(name: str, run: Callable[[argparse.Namespace], int], summary: str, description: str,
                examples: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description, epilog=f'examples:\n{examples}',
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run)
        return sub

    sub = command('finetune', _finetune, 'fine-tune a model on an image folder (or the embedded digits)',
                  'Fine-tune any zoo or timm model on an ImageFolder (DATA/train/CLASS/IMAGE and DATA/val/CLASS/IMAGE, '
                  'or DATA/CLASS/IMAGE split by --val-fraction) with timm\'s transforms, optimizer, scheduler, EMA '
                  'and mixup. Without --data it trains on scikit-learn\'s handwritten digits. Settings come from the '
                  'defaults, a --config YAML recipe (configs/), then these flags. The run folder gets best/ and last/ '
                  'Hub folders, metrics.csv, plots and the state for --resume. Under torchrun every process trains '
                  'its share (DistributedDataParallel).',
                  '  zoo finetune\n'
                  '  zoo finetune --model efficientmod_xs --data flowers/ --config configs/efficientmod.yaml\n'
                  '  zoo finetune --model od_resnet18 --checkpoint od_resnet18.pth.tar --data pets/ --epochs 20\n'
                  '  zoo finetune --resume runs/efficientmod_xs-flowers\n'
                  '  torchrun --nproc_per_node=4 -m zoo.finetune --model van_b2 --data pets/\n')
    sub.add_argument('--config', help='YAML recipe (its settings are the flags below, with underscores)')
    sub.add_argument('--resume', type=Path, metavar='RUN_DIR', help='continue the run in RUN_DIR where it stopped')
    sub.add_argument('--force', action='store_true', help='replace an earlier run in the output folder')
    _recipe_flags(sub)

    sub = command('evaluate', _evaluate, 'top-1 / top-5 and a confusion matrix on an image folder',
                  'Score a model on an ImageFolder (its val/ folder if it has one) with the model\'s own '
                  'preprocessing. Folder classes are matched to the model\'s class names (a fine-tuned model\'s '
                  'label_names, or ImageNet WordNet ids such as n01440764 for 1000-class models).',
                  '  zoo evaluate local-dir:runs/van_b0-digits/best --data digits/\n'
                  '  zoo evaluate van_b0 --checkpoint van_tiny_754.pth.tar --data imagenet-val/\n')
    sub.add_argument('model', help='MODEL[.TAG], hf-hub:ORG/NAME or local-dir:DIR')
    sub.add_argument('--data', required=True, type=Path, help='ImageFolder to score')
    sub.add_argument('--checkpoint', help='weights file to use instead of the published weights')
    sub.add_argument('--batch-size', type=_positive_int, default=32)
    sub.add_argument('--workers', type=int, default=2)

    sub = command('export', _export, 'export a model to ONNX, checked against PyTorch',
                  'Export a model (a tag, hf-hub:/local-dir: folder, or a checkpoint file zoo reads) with PyTorch\'s '
                  'exporter, check the file with onnx\'s checker and compare onnxruntime\'s outputs with PyTorch\'s '
                  '(max abs <= 1e-4, at another batch size than exported with a free batch) before it is moved into '
                  'place. Needs pip install "zoo-timm[onnx]".',
                  '  zoo export van_b0 --out van_b0.onnx --reparam\n'
                  '  zoo export local-dir:runs/van_b0-digits/best --out digits.onnx\n'
                  '  zoo export od_resnet18 --checkpoint od_resnet18.pth.tar --out od_resnet18.onnx --img-size 256\n')
    sub.add_argument('model', help='MODEL[.TAG], hf-hub:ORG/NAME or local-dir:DIR')
    sub.add_argument('--out', required=True, type=Path, help='ONNX file to write')
    sub.add_argument('--checkpoint', help='weights file to use instead of the published weights')
    sub.add_argument('--reparam', action='store_true', help='export the reparameterized (deploy) form')
    sub.add_argument('--dynamic-batch', action=argparse.BooleanOptionalAction, default=True,
                     help='leave the batch dimension free (default; --no-dynamic-batch fixes it at 1)')
    sub.add_argument('--img-size', type=_positive_int, help='input height and width (default: the pretrained cfg\'s)')

    sub = command('list', _list, 'registered models, their size and where their weights come from',
                  'List the models zoo registers with timm: family, parameters, pretrained tags and their source.',
                  "  zoo list\n  zoo list 'efficientmod_*'\n")
    sub.add_argument('pattern', nargs='?', default='*', help="shell-style name filter, e.g. 'van_*'")

    sub = command('info', _info, 'architecture, preprocessing, feature maps and weights of a model',
                  'Show a model: class, parameters, pretrained cfg (preprocessing), feature_info and manifest entry.',
                  '  zoo info van_b0\n  zoo info od_resnet50.in1k --json\n')
    sub.add_argument('model', help='MODEL or MODEL.TAG')
    sub.add_argument('--json', action='store_true', help='print everything as JSON')

    sub = command('convert', _convert, 'convert a checkpoint file into a Hub-ready folder',
                  'Read an official or foreign checkpoint (any supported layout, training containers included), '
                  'convert it and write a folder in timm\'s Hub format: config.json, model.safetensors and a '
                  'README.md model card. The folder is written beside OUT and renamed into place when complete.',
                  '  zoo convert van_b0.in1k van_tiny_754.pth.tar --out van_b0-in1k --verify\n'
                  '  zoo convert efficientmod_s model_best.pth.tar --out efficientmod_s-ema --ema\n')
    sub.add_argument('model', help='MODEL or MODEL.TAG (the tag selects the preprocessing and card details)')
    sub.add_argument('checkpoint', help='checkpoint file (.pth, .pth.tar, .bin, .safetensors)')
    sub.add_argument('--out', required=True, help='folder to write (absent or empty unless --force)')
    sub.add_argument('--ema', action='store_true', help="take the checkpoint's EMA weights (state_dict_ema)")
    sub.add_argument('--verify', action='store_true', help='reload the folder and check a forward pass before it is '
                                                           'moved into place')
    sub.add_argument('--force', action='store_true', help='replace an earlier zoo export in --out')
    sub.add_argument('--repo-id', help='ORG/NAME the folder will be published as, for the model card (optional)')
    sub.add_argument('--label-names', help='class names of a fine-tuned checkpoint: NAME,NAME,... or a text file with '
                                           'one name per line (written to config.json and the model card)')

    sub = command('publish', _publish, 'upload a converted folder to the Hugging Face Hub',
                  'Validate a Hub folder written by zoo (`zoo convert`, `zoo finetune`\'s best/ and last/, '
                  '`zoo mirror`; any timm architecture, plug-and-play models and architecture overrides included: '
                  'config.json\'s architecture and model_args are rebuilt on the meta device and the weights\' names '
                  'and shapes checked against them) and upload it to a Hub model repo (created if needed; log in '
                  'first with `hf auth login` or HF_TOKEN).',
                  '  zoo publish van_b0-in1k --repo-id me/van_b0.in1k --dry-run\n'
                  '  zoo publish van_b0-in1k --repo-id me/van_b0.in1k --private\n')
    sub.add_argument('folder', help='Hub folder written by zoo (convert, finetune, mirror)')
    sub.add_argument('--repo-id', required=True, help='ORG/NAME of the Hub repo')
    sub.add_argument('--private', action='store_true', help='create the repo private')
    sub.add_argument('--dry-run', action='store_true', help='validate and show what would be uploaded')

    sub = command('mirror', _mirror, 'maintainers: mirror the official weights to the project\'s Hub organisation',
                  'For each official tag: take the authors\' file (from --from DIR/MODEL.TAG/, or downloaded into '
                  '--download-to DIR with huggingface_hub or gdown), check its sha256 and size against the manifest '
                  '(recorded there where unknown), convert it, write a Hub folder (OUT/MODEL.TAG), check that the '
                  'folder reloads to the same logits, and publish it to HUB_ORG/MODEL.TAG unless the manifest records '
                  'that content as published; publishing marks the tag published in the manifest.',
                  '  zoo mirror --download-to originals/ --out mirror/ --dry-run\n'
                  '  zoo mirror od_resnet18.in1k --from originals/ --out mirror/\n')
    sub.add_argument('tags', nargs='*', metavar='MODEL.TAG', help='tags to mirror (default: every official tag)')
    sub.add_argument('--out', required=True, type=Path, help='folder for the Hub folders, one per tag')
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument('--from', dest='originals', type=Path, metavar='DIR',
                        help='the authors\' files, one folder per tag: DIR/MODEL.TAG/FILE')
    source.add_argument('--download-to', type=Path, metavar='DIR', help='download the authors\' files into DIR first')
    sub.add_argument('--dry-run', action='store_true', help='everything but the upload (no network with --from)')
    sub.add_argument('--manifest', type=Path, default=None, help='weights manifest to check and record in '
                                                                 '(default: the package\'s weights_manifest.yaml)')

    sub = command('predict', _predict, 'top-k classes of images',
                  'Classify image files with a model and its own preprocessing; ImageNet class names for '
                  '1000-class heads.',
                  '  zoo predict van_b0 cat.jpg dog.png\n'
                  '  zoo predict local-dir:van_b0-in1k cat.jpg --top-k 3\n'
                  '  zoo predict od_resnet18 cat.jpg --checkpoint od_resnet18.pth.tar\n')
    sub.add_argument('model', help='MODEL[.TAG], hf-hub:ORG/NAME or local-dir:DIR')
    sub.add_argument('images', nargs='+', help='image files')
    sub.add_argument('--top-k', type=_positive_int, default=5, help='classes to show per image (default 5)')
    sub.add_argument('--checkpoint', help='weights file to use instead of the published weights')
    return parser


def _report_bug() -> int:
    """The traceback of the exception being handled, and where to report it."""
    traceback.print_exc()
    print(f'zoo: this is a bug in zoo {_version()}, not a problem with what you gave it: please report it with the '
          f'command you ran and the traceback above to {_bug_tracker()}', file=sys.stderr)
    return 2


def _bug_tracker() -> str:
    """The issue tracker the installed package names, else where to find it."""
    from importlib.metadata import PackageNotFoundError, metadata
    try:
        urls = metadata('zoo').get_all('Project-URL') or []
    except PackageNotFoundError:
        urls = []
    issues = [url.split(',', 1)[1].strip() for url in urls if url.lower().startswith(('issues,', 'bug tracker,'))]
    return issues[0] if issues else "the issue tracker of zoo's source repository"


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return _fail('interrupted')
    except ZooError as e:  # a problem with what the user gave: one line says what and what to do
        return _fail(' '.join(str(e).split()))
    except Exception:
        return _report_bug()


if __name__ == '__main__':
    sys.exit(main())
