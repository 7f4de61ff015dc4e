"""PatchDDM's 3D diffusion U-Net on the fused ops, its plain-PyTorch baseline, checkpoint
import/export, and the drop-in fused GroupNorm + SiLU for other models.

    model = patchddm_fast.nn.paper_unet()                  # fused ops, the paper's config
    model = patchddm_fast.nn.paper_unet(checkpoint="cheap")  # + recompute norms in backward
    model = patchddm_fast.nn.load_original_checkpoint("savedmodel100000.pt")
"""

from .checkpoints import (CheckpointMismatchError, infer_config, load_checkpoint, load_original_checkpoint,
                          read_state_dict, save_checkpoint)
from .config import PAPER, PRESETS, SMALL, UNetConfig
from .norm import FusedGroupNormSiLU, GroupNorm32, fuse_group_norm_silu
from .unet import CHECKPOINT_MODES, ResBlock, UNet3D, paper_unet, small_unet, timestep_embedding

__all__ = [
    "CHECKPOINT_MODES", "CheckpointMismatchError", "FusedGroupNormSiLU", "GroupNorm32", "PAPER", "PRESETS",
    "ResBlock", "SMALL", "UNet3D", "UNetConfig", "fuse_group_norm_silu", "infer_config", "load_checkpoint",
    "load_original_checkpoint", "paper_unet", "read_state_dict", "save_checkpoint", "small_unet",
    "timestep_embedding",
]
