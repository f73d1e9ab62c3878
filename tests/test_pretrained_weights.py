"""Where ``pretrained=True`` takes the weights from: the project's Hub mirror where it is published, else the authors'
Hub repo, else the authors' download (gdown), with sha256 checks, offline use, one clear line for every failure, and
one download for many processes.

Offline throughout: Hub caches laid out on disk, downloads from 127.0.0.1 servers, manifests of the tests' own.
"""
import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import timm
import torch

from zoo.errors import WeightsUnavailableError
from zoo.models import create_model_from_checkpoint, pretrained_weights_file, weights_sources
from tests.helpers import (FileServer, as_transformers_layout, assert_logits_close, closed_port_url, lay_out_hub_cache,
                     manifest_copy, odconv_training_checkpoint, torch_bytes)

CHECKPOINT = '/od_resnet18.pth.tar'


@pytest.fixture
def odconv_file(reference):
    return torch_bytes(odconv_training_checkpoint(reference('od_resnet18').state_dict))


def _assert_official_logits(model, reference, name):
    ref = reference(name)
    with torch.no_grad():
        assert_logits_close(model.eval()(ref.inputs[0]), ref.outputs[0])


class TestOrder:
    def test_every_official_tag_has_a_mirror_repo_in_timms_naming_and_keeps_its_origin(self):
        from zoo.models import hub_org, load_manifest, mirror_repo
        mirrored = [tag for tag in load_manifest() if mirror_repo(tag)]
        assert len(mirrored) == 20
        assert mirror_repo('od_resnet18.in1k') == f'{hub_org()}/od_resnet18.in1k'
        assert all(weights_sources(tag)[-1].kind in ('hub', 'download') for tag in mirrored)

    def test_an_unpublished_mirror_falls_through_to_the_authors_hub_repo(self, tmp_path, reference):
        assert [s.kind for s in weights_sources('van_b0.in1k')] == ['hub']
        weights = as_transformers_layout(reference('van_b0').state_dict)
        lay_out_hub_cache(tmp_path, 'Visual-Attention-Network/van-tiny', {'pytorch_model.bin': torch_bytes(weights)})
        _assert_official_logits(timm.create_model('van_b0', pretrained=True, cache_dir=tmp_path), reference, 'van_b0')

    def test_a_published_mirror_comes_before_the_authors_files(self, tmp_path, reference):
        manifest = manifest_copy(tmp_path / 'manifest.yaml', {'van_b0.in1k': {'mirror.published': True}})
        assert [s.kind for s in weights_sources('van_b0.in1k', manifest)] == ['mirror', 'hub']
        converted = create_model_from_checkpoint('van_b0', _write(tmp_path / 'orig.bin', torch_bytes(
            as_transformers_layout(reference('van_b0').state_dict))))
        from safetensors.torch import save_file
        save_file(converted.state_dict(), tmp_path / 'model.safetensors')
        lay_out_hub_cache(tmp_path / 'hub', 'zoo-timm/van_b0.in1k',
                          {'model.safetensors': (tmp_path / 'model.safetensors').read_bytes()})
        lay_out_hub_cache(tmp_path / 'hub', 'Visual-Attention-Network/van-tiny', {'pytorch_model.bin': b'unused'})
        found = pretrained_weights_file('van_b0.in1k', cache_dir=tmp_path / 'hub', manifest=manifest)
        assert 'models--zoo-timm--van_b0.in1k' in str(found)
        _assert_official_logits(create_model_from_checkpoint('van_b0', found), reference, 'van_b0')

    def test_without_a_hub_repo_the_authors_download_is_fetched_once_into_the_cache(self, tmp_path, reference,
                                                                                       odconv_file):
        with FileServer({CHECKPOINT: odconv_file}) as server:
            manifest = manifest_copy(tmp_path / 'm.yaml', {'od_resnet18.in1k': {'source.url': server.url(CHECKPOINT)}})
            first = pretrained_weights_file('od_resnet18.in1k', cache_dir=tmp_path / 'hub', manifest=manifest)
            again = pretrained_weights_file('od_resnet18.in1k', cache_dir=tmp_path / 'hub', manifest=manifest)
        assert first == again and server.requests == {CHECKPOINT: 1}
        assert first.parent == tmp_path / 'hub' / 'zoo-downloads' / 'od_resnet18.in1k'
        _assert_official_logits(create_model_from_checkpoint('od_resnet18', first), reference, 'od_resnet18')


class TestIntegrity:
    def test_a_download_with_the_wrong_sha256_is_refused_and_not_cached(self, tmp_path, odconv_file):
        with FileServer({CHECKPOINT: odconv_file}) as server:
            manifest = manifest_copy(tmp_path / 'm.yaml', {'od_resnet18.in1k': {
                'source.url': server.url(CHECKPOINT), 'source.sha256': '0' * 64}})
            with pytest.raises(WeightsUnavailableError, match='sha256 mismatch') as error:
                pretrained_weights_file('od_resnet18.in1k', cache_dir=tmp_path / 'hub', manifest=manifest)
        assert 'pretrained=False' in str(error.value)
        assert not [p for p in (tmp_path / 'hub').rglob('*') if p.is_file() and not p.name.endswith('.lock')]

    def test_the_right_sha256_is_accepted(self, tmp_path, odconv_file):
        import hashlib
        with FileServer({CHECKPOINT: odconv_file}) as server:
            manifest = manifest_copy(tmp_path / 'm.yaml', {'od_resnet18.in1k': {
                'source.url': server.url(CHECKPOINT), 'source.sha256': hashlib.sha256(odconv_file).hexdigest()}})
            assert pretrained_weights_file('od_resnet18.in1k', cache_dir=tmp_path, manifest=manifest).is_file()


class TestWithoutNetwork:
    def test_a_cached_download_loads_without_the_network(self, tmp_path, odconv_file):
        manifest = manifest_copy(tmp_path / 'm.yaml', {'od_resnet18.in1k': {'source.url': closed_port_url()}})
        cached = tmp_path / 'zoo-downloads' / 'od_resnet18.in1k' / 'od_resnet18.pth.tar'
        cached.parent.mkdir(parents=True)
        cached.write_bytes(odconv_file)
        assert pretrained_weights_file('od_resnet18.in1k', cache_dir=tmp_path, manifest=manifest) == cached

    def test_an_unreachable_source_answers_at_once_with_the_manual_route(self, tmp_path):
        manifest = manifest_copy(tmp_path / 'm.yaml', {'od_resnet18.in1k': {'source.url': closed_port_url('/x')}})
        start = time.perf_counter()
        with pytest.raises(WeightsUnavailableError) as error:
            pretrained_weights_file('od_resnet18.in1k', cache_dir=tmp_path, manifest=manifest)
        assert time.perf_counter() - start < 5
        message = str(error.value)
        assert '\n' not in message and 'no network' in message
        for route in ('pretrained=False', '--no-pretrained', '--checkpoint FILE', 'pretrained_cfg_overlay=dict(file='):
            assert route in message


_CREATE = '''
import sys, time, timm, torch, zoo
start = time.perf_counter()
try:
    model = timm.create_model(sys.argv[1], pretrained=True).eval()
except Exception as e:
    print(f'{time.perf_counter() - start:.2f}s {type(e).__name__}: {e}')
    sys.exit(1)
inputs, expected = torch.load(sys.argv[2])
with torch.no_grad():
    print('max_abs_diff', (model(inputs) - expected).abs().max().item())
'''


def _create_in_fresh_interpreter(tmp_path, model, manifest, **env):
    environment = dict(os.environ, ZOO_WEIGHTS_MANIFEST=str(manifest), HF_HUB_CACHE=str(tmp_path / 'hub'),
                       HF_HOME=str(tmp_path / 'hf_home'), **env)
    environment.pop('HF_HUB_OFFLINE', None)
    return subprocess.run([sys.executable, '-c', _CREATE, model, str(tmp_path / 'io.pt')], env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
class TestAsUsersCallIt:
    def test_create_model_downloads_the_authors_file_then_loads_it_from_the_cache(self, tmp_path, reference,
                                                                                odconv_file):
        ref = reference('od_resnet18')
        torch.save((ref.inputs[0], ref.outputs[0]), tmp_path / 'io.pt')
        with FileServer({CHECKPOINT: odconv_file}) as server:
            manifest = manifest_copy(tmp_path / 'm.yaml', {'od_resnet18.in1k': {'source.url': server.url(CHECKPOINT)}})
            runs = [_create_in_fresh_interpreter(tmp_path, 'od_resnet18', manifest) for _ in range(2)]
        for run in runs:
            assert run.returncode == 0, run.stdout + run.stderr
            assert float(run.stdout.split('max_abs_diff')[1]) <= 1e-4
        assert server.requests == {CHECKPOINT: 1}

    def test_a_published_mirror_loads_through_create_model_like_the_original(self, tmp_path, reference):
        ref = reference('van_b0')
        torch.save((ref.inputs[0], ref.outputs[0]), tmp_path / 'io.pt')
        original = create_model_from_checkpoint('van_b0', _write(tmp_path / 'orig.bin', torch_bytes(
            as_transformers_layout(ref.state_dict))))
        from safetensors.torch import save_file
        save_file(original.state_dict(), tmp_path / 'model.safetensors')
        lay_out_hub_cache(tmp_path / 'hub', 'zoo-timm/van_b0.in1k',
                          {'model.safetensors': (tmp_path / 'model.safetensors').read_bytes()})
        manifest = manifest_copy(tmp_path / 'm.yaml', {'van_b0.in1k': {'mirror.published': True}})
        run = _create_in_fresh_interpreter(tmp_path, 'van_b0', manifest, HF_HUB_OFFLINE='1')
        assert run.returncode == 0, run.stdout + run.stderr
        with torch.no_grad():
            expected_diff = (original.eval()(ref.inputs[0]) - ref.outputs[0]).abs().max().item()
        assert float(run.stdout.split('max_abs_diff')[1]) == pytest.approx(expected_diff, abs=0)

    @pytest.mark.parametrize('model', ['van_b0', 'od_resnet18'])
    def test_without_network_or_cache_the_answer_comes_in_seconds(self, tmp_path, model):
        manifest = manifest_copy(tmp_path / 'm.yaml', {'od_resnet18.in1k': {'source.url': closed_port_url('/x')}})
        torch.save(None, tmp_path / 'io.pt')
        run = _create_in_fresh_interpreter(tmp_path, model, manifest, HF_ENDPOINT=closed_port_url().rstrip('/'))
        assert run.returncode == 1
        seconds, message = run.stdout.split('s ', 1)
        assert float(seconds) < 5, run.stdout
        assert 'WeightsUnavailableError' in message and 'no network' in message and '--checkpoint FILE' in message


def _resolve_in_process(args):
    tag, cache, manifest = args
    from zoo.models import pretrained_weights_file as resolve
    return str(resolve(tag, cache_dir=cache, manifest=manifest))


@pytest.mark.slow
def test_processes_asking_at_once_download_once_and_share_the_file(tmp_path, odconv_file):
    """As under torchrun: every rank asks for the weights; one downloads while the others wait for the file."""
    with FileServer({CHECKPOINT: odconv_file}, delay=1.0) as server:
        manifest = manifest_copy(tmp_path / 'm.yaml', {'od_resnet18.in1k': {'source.url': server.url(CHECKPOINT)}})
        with multiprocessing.get_context('spawn').Pool(3) as pool:
            paths = pool.map(_resolve_in_process, [('od_resnet18.in1k', str(tmp_path / 'hub'), str(manifest))] * 3)
    assert len(set(paths)) == 1 and server.requests == {CHECKPOINT: 1}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
