"""``zoo mirror`` (maintainers): the authors' files, one tag per family as published (a transformers
``pytorch_model.bin``, an ODConv training checkpoint, an EfficientMod Google Drive folder), become Hub folders that
reload exactly, with cards that carry the reported top-1, the preprocessing, the license, the citation, the origin and
the original's sha256; the manifest records what was seen and published. Offline: dry runs on files the tests write
from the official fixtures."""
import shutil

import pytest
import timm
import torch
import yaml

from zoo._files import file_sha256
from zoo.mirror import MirrorError, mirror_tags
from zoo.models import MANIFEST_PATH, update_manifest
from tests.helpers import (as_transformers_layout, assert_logits_close, efficientmod_training_checkpoint,
                     odconv_training_checkpoint, perturbed, run_zoo_here, torch_bytes)

TAGS = {'van_b0.in1k': 'van_b0', 'od_resnet18.in1k': 'od_resnet18', 'efficientmod_xxs.in1k': 'efficientmod_xxs'}


@pytest.fixture(scope='module')
def originals(tmp_path_factory, reference):
    """The authors' files as their download gives them, one folder per tag."""
    root = tmp_path_factory.mktemp('originals')
    files = {
        'van_b0.in1k/pytorch_model.bin': as_transformers_layout(reference('van_b0').state_dict),
        'od_resnet18.in1k/od_resnet18_1x.pth.tar': odconv_training_checkpoint(reference('od_resnet18').state_dict),
        # an EfficientMod Drive folder: the run's files; the best-named checkpoint is another model's here
        'efficientmod_xxs.in1k/model_best.pth.tar': odconv_training_checkpoint(reference('od_resnet18').state_dict),
        'efficientmod_xxs.in1k/checkpoint-299.pth.tar': efficientmod_training_checkpoint(
            reference('efficientmod_xxs').state_dict, perturbed(reference('efficientmod_xxs').state_dict)),
    }
    for name, checkpoint in files.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(torch_bytes(checkpoint))
    (root / 'efficientmod_xxs.in1k' / 'args.yaml').write_text('model: efficientMod_xxs\n')
    (root / 'efficientmod_xxs.in1k' / 'summary.csv').write_text('epoch,eval_top1\n299,77.1\n')
    return root


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory, originals):
    work = tmp_path_factory.mktemp('mirror')
    manifest = work / 'weights_manifest.yaml'
    shutil.copy(MANIFEST_PATH, manifest)
    done = list(mirror_tags(list(TAGS), work / 'out', originals=originals, dry_run=True, manifest=manifest))
    return done, manifest


def test_every_tag_reloads_to_the_official_logits(dry_run, reference):
    done, _ = dry_run
    assert [d.tag for d in done] == list(TAGS) and {d.status for d in done} == {'dry run'}
    for d in done:
        ref = reference(TAGS[d.tag])
        model = timm.create_model(f'local-dir:{d.folder}', pretrained=True).eval()
        with torch.no_grad():
            assert_logits_close(model(ref.inputs[0]), ref.outputs[0])


def test_the_checkpoint_of_the_right_model_is_taken_from_a_drive_folder(dry_run):
    efficientmod = dry_run[0][2]
    assert efficientmod.original.name == 'checkpoint-299.pth.tar'


def test_cards_carry_accuracy_preprocessing_license_citation_origin_and_sha256(dry_run):
    for d in dry_run[0]:
        card = (d.folder / 'README.md').read_text()
        entry = yaml.safe_load(MANIFEST_PATH.read_text())['tags'][d.tag]
        for expected in (f'Reported ImageNet-1k top-1: {entry["top1"]}',
                         f'crop_pct {entry["preprocessing"]["crop_pct"]}',
                         'License: apache-2.0', entry['paper']['citation'], entry['origin_url'], d.sha256,
                         f'hf-hub:{d.repo_id}', 'pip install zoo-timm'):
            assert expected in card, (d.tag, expected)


def test_the_manifest_records_the_originals_sha256_and_size(dry_run):
    done, manifest = dry_run
    written = yaml.safe_load(manifest.read_text())['tags']
    for d in done:
        assert (written[d.tag]['source']['sha256'], written[d.tag]['source']['size']) == (d.sha256, d.size)
        assert d.recorded and written[d.tag]['mirror']['published'] is False
    assert manifest.read_text().count('\n#') == MANIFEST_PATH.read_text().count('\n#')  # comments kept
    assert yaml.safe_load(MANIFEST_PATH.read_text())['tags']['van_b0.in1k']['source']['sha256'] is None


def test_a_file_other_than_the_recorded_one_is_refused(tmp_path, originals):
    manifest = shutil.copy(MANIFEST_PATH, tmp_path / 'm.yaml')
    update_manifest(manifest, 'od_resnet18.in1k', 'source', sha256='0' * 64, size=1)
    with pytest.raises(MirrorError, match='not the authors\' file'):
        list(mirror_tags(['od_resnet18.in1k'], tmp_path / 'out', originals=originals, dry_run=True,
                         manifest=manifest))
    assert not (tmp_path / 'out' / 'od_resnet18.in1k').exists()


def test_a_tag_published_with_the_same_content_is_skipped(tmp_path, originals, dry_run):
    van = dry_run[0][0]
    manifest = shutil.copy(dry_run[1], tmp_path / 'm.yaml')
    update_manifest(manifest, 'van_b0.in1k', 'mirror', published=True,
                    sha256=file_sha256(van.folder / 'model.safetensors'))
    again, = mirror_tags(['van_b0.in1k'], tmp_path / 'out', originals=originals, manifest=manifest)
    assert again.status == 'unchanged' and not again.recorded


def test_the_command_prints_a_line_per_tag(tmp_path, originals):
    manifest = shutil.copy(MANIFEST_PATH, tmp_path / 'm.yaml')
    result = run_zoo_here('mirror', 'van_b0.in1k', '--from', originals, '--out', tmp_path / 'out', '--dry-run',
                          '--manifest', manifest)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('van_b0.in1k: pytorch_model.bin') and 'would publish to zoo-timm/van_b0.in1k' \
        in result.stdout


@pytest.mark.parametrize('args, message', [
    (['nope.in1k'], 'not a mirrored tag'),
    (['van_b0.in1k'], 'no such folder'),
])
def test_bad_input_ends_in_one_line(tmp_path, args, message):
    result = run_zoo_here('mirror', *args, '--from', tmp_path / 'empty', '--out', tmp_path / 'out', '--dry-run')
    assert result.returncode == 1 and message in result.stderr and len(result.stderr.splitlines()) == 1
