"""HIPIE building blocks: early fusion, VL_Align token logits, CondInst dynamic mask head."""

from hiseg_jax.hipie.dynamic_mask_head import aligned_bilinear
from hiseg_jax.hipie.dynamic_mask_head import compute_locations
from hiseg_jax.hipie.dynamic_mask_head import dynamic_mask_logits
from hiseg_jax.hipie.dynamic_mask_head import dynamic_param_counts
from hiseg_jax.hipie.dynamic_mask_head import parse_dynamic_params
from hiseg_jax.hipie.fusion import BiAttentionBlock
from hiseg_jax.hipie.fusion import BiMultiHeadAttention
from hiseg_jax.hipie.vl_align import VLAlign

__all__ = [
    "BiAttentionBlock",
    "BiMultiHeadAttention",
    "VLAlign",
    "aligned_bilinear",
    "compute_locations",
    "dynamic_mask_logits",
    "dynamic_param_counts",
    "parse_dynamic_params",
]
