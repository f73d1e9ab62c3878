"""Bad checkpoints end in one clear error that names the problem, and nothing in them is ever executed."""
import pickle

import pytest
import torch
import timm
from safetensors.torch import save_file

from zoo.convert import CheckpointError, CheckpointMismatchError, VAN_LAYOUTS, read_checkpoint
from tests.helpers import RunsCodeWhenUnpickled, van_training_checkpoint


@pytest.fixture
def malicious_checkpoint(tmp_path):
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'van_tiny_754.pth.tar'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'args': RunsCodeWhenUnpickled(marker)}, path)
    return path, marker


@pytest.fixture
def van_b0_state_dict(reference):
    return dict(reference('van_b0').state_dict)


def _load(path):
    return timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


class TestReader:
    def test_refuses_a_pickle_that_would_run_code(self, malicious_checkpoint):
        path, marker = malicious_checkpoint
        with pytest.raises(CheckpointError, match=r'refused: unpickling it would run code \(it calls \w+\.open\)'):
            read_checkpoint(path)
        assert not marker.exists()

    def test_reads_training_checkpoints_with_args_namespace(self, tmp_path, van_b0_state_dict):
        torch.save(van_training_checkpoint(van_b0_state_dict), tmp_path / 'ck.pth.tar')
        checkpoint = read_checkpoint(tmp_path / 'ck.pth.tar')
        assert checkpoint['args'].model == 'van_b0'

    def test_truncated_pickle(self, tmp_path, van_b0_state_dict):
        torch.save(van_b0_state_dict, tmp_path / 'full.pth')
        data = (tmp_path / 'full.pth').read_bytes()
        (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
        with pytest.raises(CheckpointError, match='a damaged or truncated PyTorch checkpoint'):
            read_checkpoint(tmp_path / 'cut.pth')

    def test_truncated_safetensors_whatever_its_name(self, tmp_path, van_b0_state_dict):
        save_file(van_b0_state_dict, tmp_path / 'full.safetensors')
        data = (tmp_path / 'full.safetensors').read_bytes()
        (tmp_path / 'weights.bin').write_bytes(data[:len(data) // 2])
        with pytest.raises(CheckpointError, match='damaged safetensors file'):
            read_checkpoint(tmp_path / 'weights.bin')

    def test_not_a_checkpoint_at_all(self, tmp_path):
        (tmp_path / 'notes.pth').write_text('these are not weights')
        with pytest.raises(CheckpointError, match=r'notes\.pth: not a PyTorch or safetensors checkpoint: the file '
                                                  r'holds text \("these are not weights\.\.\."\)'):
            read_checkpoint(tmp_path / 'notes.pth')

    def test_empty_file(self, tmp_path):
        (tmp_path / 'empty.pth').write_bytes(b'')
        with pytest.raises(CheckpointError, match=r'empty\.pth: an empty file \(0 bytes\), not a checkpoint'):
            read_checkpoint(tmp_path / 'empty.pth')

    def test_a_raw_pickle_that_would_run_code_is_refused_unread(self, tmp_path):
        """Not torch.save's archive but a bare pickle (protocol 4): its opcodes are read, never run."""
        marker = tmp_path / 'code_ran'
        with open(tmp_path / 'exploit.pkl', 'wb') as f:
            pickle.dump({'state_dict': RunsCodeWhenUnpickled(marker)}, f, protocol=4)
        with pytest.raises(CheckpointError, match=r'exploit\.pkl: refused: unpickling it would run code \(it calls '
                                                  r'\w+\.open\)'):
            read_checkpoint(tmp_path / 'exploit.pkl')
        assert not marker.exists()

    def test_a_legacy_torch_save_that_would_run_code_is_refused_unread(self, tmp_path):
        """torch.save's pre-1.6 format: four pickles, the object in the last one."""
        marker = tmp_path / 'code_ran'
        torch.save({'state_dict': RunsCodeWhenUnpickled(marker)}, tmp_path / 'legacy.pth',
                   _use_new_zipfile_serialization=False)
        with pytest.raises(CheckpointError, match=r'legacy\.pth: refused: unpickling it would run code \(it calls '
                                                  r'\w+\.open\)'):
            read_checkpoint(tmp_path / 'legacy.pth')
        assert not marker.exists()

    def test_a_folder(self, tmp_path):
        with pytest.raises(CheckpointError, match='is a folder: give the checkpoint file in it'):
            read_checkpoint(tmp_path)

    def test_missing_file(self, tmp_path):
        with pytest.raises(CheckpointError, match='no such checkpoint file'):
            read_checkpoint(tmp_path / 'absent.pth')


class TestPublicLoadingPath:
    """``pretrained_cfg_overlay=dict(file=...)`` files are read by zoo's reader, with its messages."""

    def test_refuses_a_pickle_that_would_run_code(self, malicious_checkpoint):
        path, marker = malicious_checkpoint
        with pytest.raises(CheckpointError, match=r'van_tiny_754\.pth\.tar: refused: unpickling it would run code'):
            _load(path)
        assert not marker.exists()

    def test_truncated_file(self, tmp_path, van_b0_state_dict):
        torch.save(van_training_checkpoint(van_b0_state_dict), tmp_path / 'full.pth.tar')
        data = (tmp_path / 'full.pth.tar').read_bytes()
        (tmp_path / 'cut.pth.tar').write_bytes(data[:len(data) // 3])
        with pytest.raises(CheckpointError, match=r'cut\.pth\.tar: a damaged or truncated PyTorch checkpoint'):
            _load(tmp_path / 'cut.pth.tar')

    def test_missing_file(self, tmp_path):
        with pytest.raises(CheckpointError, match=r'absent\.pth: no such checkpoint file'):
            _load(tmp_path / 'absent.pth')

    def test_checkpoint_of_another_architecture(self, tmp_path):
        torch.save(timm.create_model('resnet18').state_dict(), tmp_path / 'resnet18.pth')
        with pytest.raises(CheckpointError, match=r'not a VAN checkpoint: .*first keys: \[conv1\.weight'):
            _load(tmp_path / 'resnet18.pth')

    def test_missing_keys_are_named_with_the_detected_layout(self, tmp_path, van_b0_state_dict):
        del van_b0_state_dict['block4.1.mlp.fc2.weight']
        del van_b0_state_dict['norm4.bias']
        torch.save(van_training_checkpoint(van_b0_state_dict), tmp_path / 'partial.pth.tar')
        with pytest.raises(CheckpointMismatchError) as error:
            _load(tmp_path / 'partial.pth.tar')
        assert 'detected layout: official' in str(error.value)
        assert error.value.missing == ['stages.3.blocks.1.mlp.fc2.weight', 'stages.3.norm.bias']

    def test_checkpoint_of_another_size_names_both_shapes(self, van_b0_state_dict):
        van_b1 = timm.create_model('van_b1', device='meta')
        with pytest.raises(CheckpointMismatchError) as error:
            VAN_LAYOUTS.convert(van_b0_state_dict, van_b1)
        assert ('stages.0.downsample.conv.weight', (32, 3, 7, 7), (64, 3, 7, 7)) in error.value.mismatched
        assert 'stages.0.blocks.2.attn.proj1.weight' in error.value.unexpected  # b0 has 3 blocks in stage 0, b1 two
        assert 'stages.0.blocks.0.attn.proj1.weight: checkpoint (32, 32, 1, 1) vs model (64, 64, 1, 1)' \
            in str(error.value)

    def test_unexpected_keys_are_named(self, van_b0_state_dict):
        van_b0_state_dict['block1.0.attn.extra.weight'] = torch.zeros(1)
        model = timm.create_model('van_b0', device='meta')
        with pytest.raises(CheckpointMismatchError, match=r"unexpected \[stages\.0\.blocks\.0\.attn\.extra\.weight\]"):
            VAN_LAYOUTS.convert(van_b0_state_dict, model)

    def test_container_without_a_state_dict(self):
        with pytest.raises(CheckpointError, match='not tensors'):
            VAN_LAYOUTS.convert({'epoch': 3, 'acc': 75.0}, timm.create_model('van_b0', device='meta'))
