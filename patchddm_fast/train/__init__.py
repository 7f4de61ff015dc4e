"""Training PatchDDM's U-Net on patches: one process, many (torchrun), CPU or GPU.

    from patchddm_fast.train import TrainConfig, train, load_trained_model

    result = train(TrainConfig("BraTS2020_TrainingData", "runs/paper", preset="paper", steps=100_000,
                               precision="bf16"))
    model, info = load_trained_model(result.checkpoint)       # EMA weights, eval mode; a CheckpointInfo

Command line (patchddm train): add_train_arguments(parser) and config_from_args(args).
Data-parallel: `torchrun --nproc_per_node=N -m patchddm_fast.cli train ...` (or any script
calling train()); each process gets batch_size patches per step.
"""

from .checkpoints import load_trained_model, read_training_checkpoint
from .config import PRESET_DEFAULTS, TrainConfig, add_train_arguments, config_from_args
from .trainer import TrainResult, train
from .validation import ValidationScores, Validator, evaluate_checkpoint

__all__ = [
    "PRESET_DEFAULTS", "TrainConfig", "TrainResult", "ValidationScores", "Validator", "add_train_arguments",
    "config_from_args", "evaluate_checkpoint", "load_trained_model", "read_training_checkpoint", "train",
]
