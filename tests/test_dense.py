"""Dense prediction: zoo.dense_backbone in torchvision's detectors and the FPN segmenter, on every family and on a
plug-and-play CNN; the shapes data set and the COCO / mask folder checks; ``zoo finetune --task detect|segment``."""
import json
import logging
import re
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from torch.utils.data import DataLoader
from torchvision.models.detection import fasterrcnn_resnet50_fpn

import zoo
from zoo.dense import FPNSegmenter, dense_backbone, detector, load_dense_model
from zoo.finetune import DataError
from zoo.finetune.dense_data import CocoDetections, MaskImages, detection_collate, read_dense_folder
from zoo.finetune.shapes import SHAPE_CLASSES, shapes_folder
from zoo.hub import export_hub_folder
from zoo.layers import XVolution2d
from tests.helpers import relative_error, run_zoo, run_zoo_here

SIZE = 64  # the tests' image size: every family's four strides, in milliseconds per step
FAMILIES = ['van_b0', 'od_resnet18', 'efficientmod_xxs', 'xvolution_resnet34', 'resnet50+odconv']


def _model(name: str) -> torch.nn.Module:
    """A zoo model, or ``BASE+OP``: a timm model with its convs replaced by ``zoo.replace_convs``."""
    torch.manual_seed(0)
    base, _, op = name.partition('+')
    model = timm.create_model(base)
    if op:
        zoo.replace_convs(model, op, count_macs=False)
    return model


@pytest.fixture(scope='session')
def shapes(tmp_path_factory):
    return shapes_folder(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='session')
def small_shapes(shapes, tmp_path_factory):
    """The first 12 training and 6 validation images of the shapes: a data folder for whole runs in seconds."""
    root = tmp_path_factory.mktemp('small') / 'shapes'
    for split, count in (('train', 12), ('val', 6)):
        coco = json.loads((shapes / split / 'annotations.json').read_text())
        coco['images'] = coco['images'][:count]
        kept = {image['id'] for image in coco['images']}
        coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] in kept]
        for sub in ('images', 'masks'):
            (root / split / sub).mkdir(parents=True)
            for image in coco['images']:
                name = image['file_name'].split('/')[-1]
                shutil.copy(shapes / split / sub / name, root / split / sub / name)
        (root / split / 'annotations.json').write_text(json.dumps(coco))
    shutil.copy(shapes / 'classes.txt', root / 'classes.txt')
    return root


def _detection_batch(shapes, count: int, masks: bool = False):
    data = read_dense_folder(shapes, 'detect')
    images, targets = next(iter(DataLoader(CocoDetections(data.train, train=False, masks=masks), batch_size=count,
                                           collate_fn=detection_collate)))
    return images, targets


def _loss_falls(model: torch.nn.Module, loss_of, steps: int = 4) -> None:
    """A few SGD steps on one batch lower its loss (every step's sampling drawn alike)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps + 1):
        torch.manual_seed(0)
        loss = loss_of(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


# backbones -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', FAMILIES)
def test_backbone_gives_the_pyramid_and_the_stage_features(name):
    model = _model(name)
    backbone = dense_backbone(model, out_channels=32)
    assert backbone.reductions == [4, 8, 16, 32] and backbone.strides == [4, 8, 16, 32, 64]
    features = backbone.eval()(torch.randn(1, 3, SIZE, SIZE))
    assert list(features) == ['0', '1', '2', '3', 'pool']
    assert [f.shape for f in features.values()] == [(1, 32, SIZE // s, SIZE // s) for s in backbone.strides]
    stages = dense_backbone(_model(name), fpn=False, freeze_bn=False).eval()
    expected = _model(name).eval().forward_intermediates(torch.ones(1, 3, SIZE, SIZE), intermediates_only=True)
    got = list(stages(torch.ones(1, 3, SIZE, SIZE)).values())
    assert [g.shape[1] for g in got] == stages.channels and stages.out_channels == stages.channels[-1]
    torch.testing.assert_close(got, expected[-4:])


def test_backbone_freezes_batchnorm_and_the_first_stages():
    backbone = dense_backbone(_model('od_resnet18'), trainable_stages=2)
    model = backbone.body.model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    trainable = {name.split('.')[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {'layer3', 'layer4'}
    everything = dense_backbone(_model('od_resnet18'), trainable_stages=None, freeze_bn=False)
    assert all(p.requires_grad for p in everything.body.model.parameters())


def test_backbone_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match='no timm feature_info'):
        dense_backbone(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match='unknown extra_blocks'):
        dense_backbone(_model('van_b0'), extra_blocks='p7')
    with pytest.raises(ValueError, match='go with a model name'):
        dense_backbone(_model('van_b0'), pretrained=True)
    with pytest.raises(ValueError, match='unknown model'):
        dense_backbone('van_bo')
    with pytest.raises(ValueError, match="retinanet needs dense_backbone\\(..., extra_blocks='p6p7'"):
        detector('retinanet', dense_backbone(_model('van_b0')), 4)


def test_backbone_loads_a_finetuned_local_dir_folder(tmp_path):
    torch.manual_seed(1)
    finetuned = timm.create_model('efficientmod_xxs', num_classes=7)
    for p in finetuned.parameters():  # weights no fresh model has
        p.data.add_(0.01 * torch.randn_like(p))
    export_hub_folder(finetuned, tmp_path / 'pets', label_names=[f'breed{i}' for i in range(7)])
    backbone = dense_backbone(f'local-dir:{tmp_path / "pets"}', fpn=False).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    expected = finetuned.eval().forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(list(backbone(x).values()), expected)
    assert backbone.body.model.num_classes == 0


# detectors and segmenter ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', FAMILIES)
def test_faster_rcnn_trains_and_detects(name, shapes):
    images, targets = _detection_batch(shapes, 2)
    model = detector('fasterrcnn', dense_backbone(_model(name), out_channels=32), len(SHAPE_CLASSES) + 1, SIZE)
    _loss_falls(model, lambda m: sum(m(images, targets).values()))
    detections = model.eval()(images)
    assert len(detections) == 2
    for d in detections:
        assert d['boxes'].shape == (len(d['scores']), 4) and d['labels'].shape == d['scores'].shape
        assert (d['boxes'] >= 0).all() and (d['boxes'] <= images[0].shape[-1]).all()


@pytest.mark.parametrize('name', FAMILIES)
def test_retinanet_trains_and_detects(name, shapes):
    images, targets = _detection_batch(shapes, 2)
    backbone = dense_backbone(_model(name), out_channels=32, extra_blocks='p6p7')
    assert list(backbone.eval()(torch.zeros(1, 3, SIZE, SIZE))) == ['0', '1', '2', 'p6', 'p7']
    model = detector('retinanet', backbone, len(SHAPE_CLASSES) + 1, SIZE)
    _loss_falls(model, lambda m: sum(m(images, targets).values()))
    for d in model.eval()(images):
        assert d['boxes'].shape == (len(d['scores']), 4)


@pytest.mark.parametrize('name', FAMILIES)
def test_segmenter_trains_and_gives_per_pixel_logits(name, shapes):
    data = read_dense_folder(shapes, 'segment')
    assert data.classes == ['background', *SHAPE_CLASSES]
    cfg = _model(name).pretrained_cfg
    images, masks = next(iter(DataLoader(MaskImages(data.train, SIZE, cfg['mean'], cfg['std'], train=False),
                                         batch_size=2)))
    model = FPNSegmenter(dense_backbone(_model(name), out_channels=32), len(data.classes))
    _loss_falls(model, lambda m: torch.nn.functional.cross_entropy(m(images)['out'], masks))
    out = model.eval()(images)['out']
    assert out.shape == (2, len(data.classes), SIZE, SIZE)


def test_mask_rcnn_returns_instance_masks(shapes):
    images, targets = _detection_batch(shapes, 2, masks=True)
    height, width = images[0].shape[-2:]  # masks and detections at the image's own size
    assert targets[0]['masks'].shape == (len(targets[0]['boxes']), height, width)
    model = detector('maskrcnn', dense_backbone(_model('van_b0'), out_channels=32), len(SHAPE_CLASSES) + 1, SIZE)
    _loss_falls(model, lambda m: sum(m(images, targets).values()))
    for d in model.eval()(images):
        assert d['masks'].shape == (len(d['scores']), 1, height, width)


def test_odconv_backbone_trains_at_batch_one(shapes):
    images, targets = _detection_batch(shapes, 1)
    # BatchNorm trained too: timm's ResNets start each block's last BatchNorm at zero, which frozen would keep the
    # residual branches (and their ODConv attention) without gradients
    backbone = dense_backbone(_model('od_resnet18'), out_channels=32, freeze_bn=False)
    model = detector('fasterrcnn', backbone, len(SHAPE_CLASSES) + 1, SIZE)
    attention = backbone.body.model.layer4[1].conv1.attention
    before = attention.fc.weight.detach().clone()
    _loss_falls(model, lambda m: sum(m(images, targets).values()))
    assert not torch.equal(attention.fc.weight, before)  # the attention itself learns at batch 1


def test_replace_convs_inside_a_detector_keeps_its_outputs():
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=SIZE, max_size=SIZE,
                                    box_score_thresh=0.0).eval()
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    with torch.no_grad():
        before_features, before = model.backbone(torch.stack(images)), model(images)
    _, report = zoo.replace_convs(model.backbone.body, 'odconv', count_macs=False)
    assert len(report.replaced) > 40
    with torch.no_grad():
        after_features, after = model.backbone(torch.stack(images)), model(images)
    for level in before_features:  # float rounding only
        assert relative_error(after_features[level], before_features[level]) < 1e-5, level
    for b, a in zip(before, after):
        assert torch.equal(a['labels'], b['labels'])
        torch.testing.assert_close(a['scores'], b['scores'], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a['boxes'], b['boxes'], rtol=1e-4, atol=1e-3)


def test_replace_convs_inside_a_zoo_detector_keeps_its_outputs():
    model = detector('fcos', dense_backbone(_model('resnet18'), out_channels=32, extra_blocks='p6p7'), 4, SIZE)
    model.eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model.backbone(x)
    _, report = zoo.replace_convs(model.backbone.body.model, 'xvolution', count_macs=False)
    assert any(isinstance(m, XVolution2d) for m in model.modules()) and report.replaced
    with torch.no_grad():
        after = model.backbone(x)
    for level in before:
        assert relative_error(after[level], before[level]) < 1e-5, level


# data ----------------------------------------------------------------------------------------------------------------

def test_shapes_are_generated_once_and_deterministically(shapes, tmp_path):
    again = shapes_folder(tmp_path)
    for split in ('train', 'val'):
        assert (again / split / 'annotations.json').read_bytes() == (shapes / split / 'annotations.json').read_bytes()
    assert (again / 'train' / 'images' / '0005.png').read_bytes() == (shapes / 'train' / 'images' / '0005.png'
                                                                       ).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ['shapes-v1']  # no temporary folder left


def _coco_folder(root, annotations, images=({'id': 1, 'file_name': 'a.png', 'width': 32, 'height': 32},)):
    from PIL import Image
    for split in ('train', 'val'):
        (root / split).mkdir(parents=True)
        for image in images:
            Image.new('RGB', (image['width'], image['height'])).save(root / split / image['file_name'])
        coco = dict(images=list(images), annotations=annotations,
                    categories=[{'id': 3, 'name': 'cat'}, {'id': 7, 'name': 'dog'}])
        (root / split / 'annotations.json').write_text(json.dumps(coco))
    return root


def _box(id_, bbox, category=3, image=1):
    return dict(id=id_, image_id=image, category_id=category, bbox=bbox, area=bbox[2] * bbox[3], iscrowd=0)


def test_coco_boxes_outside_the_image_and_empty_images_are_counted(tmp_path, caplog):
    images = ({'id': 1, 'file_name': 'a.png', 'width': 32, 'height': 32},
              {'id': 2, 'file_name': 'b.png', 'width': 32, 'height': 32})
    root = _coco_folder(tmp_path, [_box(1, [20, 20, 30, 30]), _box(2, [40, 40, 5, 5]), _box(3, [2, 2, 8, 8], 7)],
                        images)
    with caplog.at_level(logging.WARNING):
        data = read_dense_folder(root, 'detect')
    messages = [r.getMessage() for r in caplog.records]
    assert any('1 of 3 boxes' in m and 'leave their image' in m and 'clipped' in m for m in messages)
    assert any('1 of 3 boxes' in m and 'no area' in m for m in messages)
    assert any('1 of 2 images' in m and 'no annotations' in m for m in messages)
    assert data.classes == ['cat', 'dog']
    dataset = CocoDetections(data.train, train=False)
    image, target = dataset[0]
    torch.testing.assert_close(target['boxes'], torch.tensor([[20., 20., 32., 32.], [2., 2., 10., 10.]]))
    assert target['labels'].tolist() == [1, 2]  # category ids 3, 7 -> labels 1, 2
    _, empty = dataset[1]
    assert empty['boxes'].shape == (0, 4) and empty['labels'].shape == (0,)


@pytest.mark.parametrize('annotations, message', [
    ([_box(1, [1, 1, 5, 5], category=9)], 'category ids that are not among its categories'),
    ([_box(1, [1, 1, 5, 5], image=4)], 'image ids in annotations are not among its images'),
])
def test_coco_files_that_cannot_be_used_are_one_line_errors(tmp_path, annotations, message):
    root = _coco_folder(tmp_path, annotations)
    with pytest.raises(DataError, match=message) as error:
        read_dense_folder(root, 'detect')
    assert '\n' not in str(error.value)


def test_detection_data_errors_name_the_file(tmp_path):
    root = _coco_folder(tmp_path, [])
    (root / 'val' / 'annotations.json').write_text('{not json')
    with pytest.raises(DataError, match='val/annotations.json: not a JSON file'):
        read_dense_folder(root, 'detect')
    (root / 'val' / 'a.png').unlink()
    (root / 'val' / 'annotations.json').write_text((root / 'train' / 'annotations.json').read_text())
    with pytest.raises(DataError, match='1 of 1 image files are missing'):
        read_dense_folder(root, 'detect')


def test_mask_indices_beyond_the_class_names_are_refused(small_shapes, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(small_shapes, root)
    (root / 'classes.txt').write_text('background\nrectangle\n')
    with pytest.raises(DataError, match='names 2 classes'):
        read_dense_folder(root, 'segment')


# zoo finetune --task detect / segment -------------------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_detect_writes_a_run_that_resumes_and_reloads(small_shapes, tmp_path):
    run = tmp_path / 'run'
    args = ['finetune', '--task', 'detect', '--data', str(small_shapes), '--model', 'van_b0', '--no-pretrained',
            '--img-size', '64', '--batch-size', '4', '--fpn-channels', '64', '--workers', '0', '--output', str(run)]
    first = run_zoo(*args, '--epochs', '1')
    assert first.returncode == 0, first.stderr
    assert 'best validation map50' in first.stdout
    changed = run_zoo('finetune', '--resume', str(run), '--epochs', '2')
    assert changed.returncode != 0 and '--epochs differs' in changed.stderr  # a resumed run keeps its recipe
    config = (run / 'config.yaml').read_text()
    (run / 'config.yaml').write_text(re.sub('^epochs: 1$', 'epochs: 2', config, flags=re.M))  # stopped at 1 of 2
    resumed = run_zoo('finetune', '--resume', str(run))
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(run / 'state.pth', weights_only=True)
    assert state['epoch'] == 2 and state['task'] == 'detect'
    rows = (run / 'metrics.csv').read_text().splitlines()
    assert rows[0] == 'epoch,train_loss,val_map50,val_map,lr,train_img_s,seconds' and len(rows) == 3
    model = load_dense_model(run / 'best')
    detections = model([torch.rand(3, 64, 64)])
    assert detections[0]['boxes'].shape[1] == 4
    backbone = dense_backbone(f'local-dir:{run / "best" / "backbone"}')
    assert backbone.body.model.pretrained_cfg['architecture'] == 'van_b0'


@pytest.mark.slow
def test_finetune_segment_on_a_mask_folder(small_shapes, tmp_path):
    result = run_zoo('finetune', '--task', 'segment', '--data', str(small_shapes), '--model', 'od_resnet18',
                     '--no-pretrained', '--img-size', '64', '--batch-size', '4', '--epochs', '1', '--workers', '0',
                     '--fpn-channels', '32', '--output', str(tmp_path / 'run'))
    assert result.returncode == 0, result.stderr
    assert 'best validation miou' in result.stdout
    model = load_dense_model(tmp_path / 'run' / 'best')
    assert model(torch.rand(1, 3, 64, 64))['out'].shape == (1, 4, 64, 64)


@pytest.mark.slow
def test_torchrun_two_processes_detect_and_save_once(small_shapes, tmp_path):
    output = tmp_path / 'run'
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '-m', 'zoo.finetune', '--task', 'detect',
         '--data', small_shapes, '--model', 'resnet10t', '--no-pretrained', '--img-size', '64', '--epochs', '1',
         '--batch-size', '2', '--fpn-channels', '64', '--workers', '0', '--output', output],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('best validation map50') == 1  # rank 0 alone reports
    assert sorted(p.name for p in output.iterdir()) == ['best', 'config.yaml', 'last', 'metrics.csv', 'state.pth']
    assert json.loads((output / 'best' / 'dense.json').read_text())['classes'] == list(SHAPE_CLASSES)

def test_finetune_with_bad_data_writes_nothing(tmp_path):
    root = _coco_folder(tmp_path / 'data', [_box(1, [1, 1, 5, 5], category=9)])
    result = run_zoo_here('finetune', '--task', 'detect', '--data', str(root), '--no-pretrained', '--model', 'resnet18',
                     '--output', str(tmp_path / 'run'))
    assert result.returncode == 1
    assert result.stderr.count('\n') == 1 and 'category ids that are not among its categories' in result.stderr
    assert not (tmp_path / 'run').exists()


def test_classification_only_settings_are_refused_for_dense_tasks(tmp_path):
    result = run_zoo_here('finetune', '--task', 'segment', '--mixup', '0.2', '--ema-decay', '0.99', '--data',
                          str(tmp_path / 'data'), '--output', str(tmp_path / 'run'))
    assert result.returncode == 1
    assert '--mixup, --ema-decay apply to classification only' in result.stderr
    assert not (tmp_path / 'run').exists()
