"""weights_manifest.yaml is the single source of truth for the pretrained cfgs, and it tells the truth."""
import pytest
import timm
from timm.data import resolve_data_config

from zoo.models import FAMILY_MODULES, load_manifest

MANIFEST = load_manifest()


def test_pretrained_tags_are_exactly_the_manifest():
    registered = {name for family in FAMILY_MODULES for name in timm.list_models(module=family, include_tags=True)
                  if not name.endswith('.untrained')}
    assert registered == set(MANIFEST)


@pytest.mark.parametrize('tag', MANIFEST)
def test_pretrained_cfg_carries_the_manifest_entry(tag):
    entry, cfg = MANIFEST[tag], timm.models.get_pretrained_cfg(tag).to_dict()
    pre = entry['preprocessing']
    assert (cfg['input_size'], cfg['interpolation'], cfg['crop_pct'], cfg['mean'], cfg['std']) == (
        tuple(pre['input_size']), pre['interpolation'], pre['crop_pct'], tuple(pre['mean']), tuple(pre['std']))
    assert (cfg['license'], cfg['paper_ids'], cfg['origin_url']) == (
        entry['license'], entry['paper']['id'], entry['origin_url'])
    if 'hf_hub_id' in entry['source']:
        assert (cfg['hf_hub_id'], cfg['hf_hub_filename']) == (
            entry['source']['hf_hub_id'], entry['source']['hf_hub_filename'])


@pytest.mark.parametrize('tag', MANIFEST)
def test_parameter_count_matches_the_built_model(tag):
    model = timm.create_model(tag.split('.')[0], device='meta')
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == MANIFEST[tag]['params_m']


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
