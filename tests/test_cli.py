"""The ``zoo`` command: listing and help (the Hub workflow is in test_hub_workflow.py)."""
from helpers import run_zoo, run_zoo_here


def test_list_shows_every_model_with_params_and_weight_source():
    result = run_zoo('list')  # the console script, as a user runs it
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line and not line[0].isspace()}
    assert {'van_b0', 'van_b1', 'van_b2', 'van_b3', 'van_b4', 'van_b5', 'van_b6'} <= set(rows)
    assert '4.106' in rows['van_b0'] and 'hf-hub:Visual-Attention-Network/van-tiny/pytorch_model.bin' in rows['van_b0']
    assert 'none (architecture only)' in rows['van_b6']


def test_list_filters_by_pattern():
    result = run_zoo_here('list', 'van_b[12]')
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == ['van_b1', 'van_b2']


def test_unknown_pattern_is_one_line_and_non_zero():
    result = run_zoo_here('list', 'resnet*')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["zoo: no model matches 'resnet*'; `zoo list` shows them all"]


def test_help_has_examples():
    result = run_zoo_here('--help')
    assert result.returncode == 0 and 'examples:' in result.stdout
