"""Fine-tuning: ``zoo finetune`` and ``python -m zoo.finetune`` (so ``torchrun ... -m zoo.finetune``)."""
from .data import DataError, read_image_folder
from .evaluate import Evaluation, evaluate, evaluate_folder
from .recipe import DIGITS_DEFAULTS, Recipe, RecipeError, recipe_for_run, resolve_recipe
from .run_folder import ModelCard, RunFolder, RunFolderError
from .trainer import FinetuneResult, Run, TrainingState, finetune, prepare_run, train_one_epoch, validate

__all__ = [
    'DIGITS_DEFAULTS', 'DataError', 'Evaluation', 'FinetuneResult', 'ModelCard', 'Recipe', 'RecipeError', 'Run',
    'RunFolder', 'RunFolderError', 'TrainingState', 'evaluate', 'evaluate_folder', 'finetune', 'prepare_run',
    'read_image_folder', 'recipe_for_run', 'resolve_recipe', 'train_one_epoch', 'validate',
]
