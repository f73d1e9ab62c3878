"""The ``zoo`` command: listing, help, and how it ends on a user's error and on a bug in zoo (the Hub workflow is in
test_hub_workflow.py)."""
import pytest
from PIL import Image

import zoo.catalogue
from tests.helpers import run_zoo, run_zoo_here


@pytest.mark.slow
def test_list_shows_every_model_with_params_and_weight_source_within_120_columns():
    result = run_zoo('list')  # the console script, as a user runs it
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    rows = {line.split()[0]: i for i, line in enumerate(lines[1:], 1) if line and not line[0].isspace()}
    assert {'van_b0', 'van_b1', 'van_b2', 'van_b3', 'van_b4', 'van_b5', 'van_b6'} <= set(rows)
    van_b0 = rows['van_b0']
    assert '4.106' in lines[van_b0]
    assert lines[van_b0 + 1] == ('    van_b0.in1k: hf-hub:Visual-Attention-Network/van-tiny/pytorch_model.bin '
                                 '(transformers layout)')
    assert lines[rows['van_b6']].endswith('  none')


def test_list_filters_by_pattern():
    result = run_zoo_here('list', 'van_b[12]')
    names = [line.split()[0] for line in result.stdout.splitlines()[1:] if not line[0].isspace()]
    assert names == ['van_b1', 'van_b2']


def test_unknown_pattern_is_one_line_and_non_zero():
    result = run_zoo_here('list', 'resnet*')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["zoo: no model matches 'resnet*'; `zoo list` shows them all"]


def test_help_has_examples():
    result = run_zoo_here('--help')
    assert result.returncode == 0 and 'examples:' in result.stdout


@pytest.mark.slow
def test_version_and_module_entry_point():
    import subprocess
    import sys
    import zoo
    result = run_zoo_here('--version')
    assert result.returncode == 0 and result.stdout.strip() == f'zoo {zoo.__version__}'
    as_module = subprocess.run([sys.executable, '-m', 'zoo', 'list', 'van_b0'], capture_output=True, text=True,
                               timeout=120)
    assert as_module.returncode == 0 and as_module.stdout.splitlines()[1].startswith('van_b0 ')


def test_a_typo_gets_a_suggestion():
    result = run_zoo_here('info', 'van_bo')
    assert result.returncode == 1
    assert result.stderr == ("zoo: unknown model 'van_bo': did you mean van_b0? "
                             "`zoo list` shows the models zoo registers\n")


def test_a_user_error_is_one_line_without_a_traceback(tmp_path):
    result = run_zoo_here('predict', 'van_b0', tmp_path / 'missing.png')
    assert result.returncode == 1
    assert result.stderr == f'zoo: {tmp_path / "missing.png"}: no such image file\n'


def test_weights_that_cannot_be_read_are_a_user_error_not_a_bug(tmp_path):
    Image.new('RGB', (8, 8)).save(tmp_path / 'cat.png')
    result = run_zoo_here('predict', f'local-dir:{tmp_path / "absent"}', tmp_path / 'cat.png')
    assert result.returncode == 1
    assert result.stderr.startswith(f'zoo: cannot load the weights of local-dir:{tmp_path / "absent"}: ')
    assert result.stderr.count('\n') == 1


def test_an_unexpected_error_shows_its_traceback_and_asks_for_a_bug_report(monkeypatch):
    def broken(pattern):  # a bug inside zoo: an error no user input explains
        return {}[pattern]
    monkeypatch.setattr(zoo.catalogue, 'summarize_models', broken)
    result = run_zoo_here('list', 'van_b0')
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == 'Traceback (most recent call last):'
    assert "KeyError: 'van_b0'" in lines and 'in broken' in result.stderr
    assert lines[-1].startswith(f'zoo: this is a bug in zoo {zoo.__version__}, not a problem with what you gave it: '
                                f'please report it')


def test_export_has_no_format_option(tmp_path):
    result = run_zoo_here('export', 'van_b0', '--out', tmp_path / 'm.onnx', '--format', 'onnx')
    assert result.returncode == 2 and 'unrecognized arguments: --format onnx' in result.stderr
