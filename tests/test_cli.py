"""The ``zoo`` command: listing and help (the Hub workflow is in test_hub_workflow.py)."""
from helpers import run_zoo, run_zoo_here


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
