"""MedGMAE models: masked 3D ViT encoder, Gaussian decoder (MedGMAE, MedGMAE*), voxel-MAE baseline."""
from .configs import CONFIG_NAMES, LOSSES, OBJECTIVES, ModelConfig, get_config
from .gaussian_decoder import GaussianDecoder, GaussianHeads
from .medgmae import (DEFAULT_MASK_POLICY, MASK_POLICIES, MaskedAutoencoder3D, MedGMAE, ModelOutput, VoxelMAE,
                      build_model)
from .residual_levels import ResidualLevel
from .vit import ViTEncoder3D, random_masking, sincos_position_embedding_3d
from .voxel_decoder import VoxelDecoder

__all__ = [
    "DEFAULT_MASK_POLICY", "MASK_POLICIES", "CONFIG_NAMES", "LOSSES", "OBJECTIVES", "ModelConfig", "build_model", "get_config",
    "GaussianDecoder", "GaussianHeads", "MaskedAutoencoder3D", "MedGMAE", "ModelOutput", "VoxelMAE",
    "ResidualLevel", "ViTEncoder3D", "random_masking", "sincos_position_embedding_3d", "VoxelDecoder",
]
