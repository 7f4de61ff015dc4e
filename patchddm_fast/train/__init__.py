"""Training PatchDDM's U-Net on patches: one process, many (torchrun), CPU or GPU.

    from patchddm_fast.train import TrainConfig, train, load_trained_model

    result = train(TrainConfig("BraTS2020_TrainingData", "runs/paper", preset="paper", steps=100_000,
                               precision="bf16"))
    model, info = load_trained_model(result.checkpoint)       # EMA weights, eval mode

Command line (patchddm train): add_train_arguments(parser) and config_from_args(args).
Data-parallel: `torchrun --nproc_per_node=N -m patchddm_fast.cli train ...` (or any script
calling train()); each process gets batch_size patches per step.
The demo's settings: demo_recipe().
"""

from .checkpoints import LAST, load_trained_model, make_schedule, read_training_checkpoint
from .config import PRESET_DEFAULTS, TrainConfig, add_train_arguments, config_from_args
from .demo import DemoRecipe, demo_recipe
from .trainer import TrainResult, data_volume_edge, train
from .validation import Evaluation, Validator, evaluate_checkpoint

__all__ = [
    "LAST", "PRESET_DEFAULTS", "DemoRecipe", "Evaluation", "TrainConfig", "TrainResult", "Validator",
    "add_train_arguments", "config_from_args", "data_volume_edge", "demo_recipe", "evaluate_checkpoint",
    "load_trained_model", "make_schedule", "read_training_checkpoint", "train",
]
