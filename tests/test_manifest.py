"""weights_manifest.yaml and the models agree with the papers: the parameter counts of the official code and the
top-1 the authors report, both written here from their sources (not read from the manifest they check)."""
import pytest
import timm
from timm.data import resolve_data_config

from zoo.models import FAMILY_MODULES, load_manifest

MANIFEST = load_manifest()

# parameters (millions) of the models as the official code builds them (DESIGN.md; the ODConv README rounds them to
# 0.01 M, e.g. 11.94 M, 44.90 M)
OFFICIAL_PARAMS_M = {
    'van_b0': 4.106, 'van_b1': 13.862, 'van_b2': 26.578, 'van_b3': 44.766,
    'od_resnet18': 11.944, 'od_resnet18_4x': 44.902, 'od_resnet34': 22.290, 'od_resnet34_4x': 85.551,
    'od_resnet50': 28.635, 'od_resnet50_4x': 90.671, 'od_resnet101': 50.819, 'od_resnet101_2x': 90.442,
    'od_mobilenetv2_050': 2.426, 'od_mobilenetv2_050_4x': 4.436, 'od_mobilenetv2_075': 3.507,
    'od_mobilenetv2_075_4x': 7.496, 'od_mobilenetv2_100': 4.940, 'od_mobilenetv2_100_4x': 11.512,
    'efficientmod_xxs': 4.736, 'efficientmod_xs': 6.628, 'efficientmod_s': 12.897, 'efficientmod_s_conv': 12.872,
}

# ImageNet-1k top-1 (%) the authors report for the weights they published: the VAN paper (arXiv 2202.09741, table of
# ImageNet results), the ODConv README (its released re-trained models, which differ slightly from the paper's) and
# the EfficientMod README (arXiv 2403.19967). X-volution has no published weights.
REPORTED_TOP1 = {
    'van_b0.in1k': 75.4, 'van_b1.in1k': 81.1, 'van_b2.in1k': 82.8, 'van_b3.in1k': 83.9,
    'od_resnet18.in1k': 73.05, 'od_resnet18_4x.in1k': 74.19, 'od_resnet50.in1k': 77.87, 'od_resnet50_4x.in1k': 78.50,
    'od_resnet101.in1k': 78.84, 'od_resnet101_2x.in1k': 79.15,
    'od_mobilenetv2_050.in1k': 68.06, 'od_mobilenetv2_050_4x.in1k': 70.23, 'od_mobilenetv2_075.in1k': 72.71,
    'od_mobilenetv2_075_4x.in1k': 74.01, 'od_mobilenetv2_100.in1k': 74.74, 'od_mobilenetv2_100_4x.in1k': 75.29,
    'efficientmod_xxs.in1k': 77.1, 'efficientmod_xs.in1k': 79.4, 'efficientmod_s.in1k': 81.9,
    'efficientmod_s_conv.in1k': 80.5,
}


def test_pretrained_tags_are_exactly_the_manifest():
    registered = {name for family in FAMILY_MODULES for name in timm.list_models(module=family, include_tags=True)
                  if not name.endswith('.untrained')}
    assert registered == set(MANIFEST)


@pytest.mark.parametrize('name', OFFICIAL_PARAMS_M)
def test_parameter_count_is_the_official_codes(name):
    model = timm.create_model(name, device='meta')  # shapes only
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == OFFICIAL_PARAMS_M[name]


def test_the_manifest_states_the_reported_top1_and_official_size_of_every_published_model():
    published = {tag: entry for tag, entry in MANIFEST.items() if entry['top1'] is not None}
    assert {tag: entry['top1'] for tag, entry in published.items()} == REPORTED_TOP1
    assert {tag: entry['params_m'] for tag, entry in published.items()} == {
        tag: OFFICIAL_PARAMS_M[tag.split('.')[0]] for tag in REPORTED_TOP1}


def test_van_uses_its_training_preprocessing_not_the_transformers_config():
    config = resolve_data_config(model=timm.create_model('van_b2'))
    assert config['mean'] == config['std'] == (0.5, 0.5, 0.5)
    assert (config['crop_pct'], config['interpolation']) == (0.9, 'bicubic')


def test_an_incomplete_entry_is_rejected_with_its_name(tmp_path):
    path = tmp_path / 'manifest.yaml'
    path.write_text('hub_org: someone\ntags:\n  van_b0.in1k:\n    family: van\n    params_m: 4.106\n')
    with pytest.raises(ValueError, match=r"entry 'van_b0\.in1k' lacks top1, license, .*preprocessing\.input_size"):
        load_manifest(path)


def test_a_manifest_without_its_hub_org_is_rejected(tmp_path):
    path = tmp_path / 'manifest.yaml'
    path.write_text('van_b0.in1k:\n  family: van\n')
    with pytest.raises(ValueError, match='hub_org name and a tags mapping'):
        load_manifest(path)


def test_the_weights_carry_their_repositorys_license():
    """VAN-Classification, OSVAI/ODConv (since September 2023; MIT before) and ma-xu/EfficientMod (LICENSE added in
    January 2024) are Apache-2.0, and so are timm's ResNet weights behind the X-volution warm starts."""
    assert {tag: entry['license'] for tag, entry in MANIFEST.items()} == {tag: 'apache-2.0' for tag in MANIFEST}
