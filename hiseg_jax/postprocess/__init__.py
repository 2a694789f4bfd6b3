"""HIPIE inference post-processing: boxes / NMS, instances, semantic + panoptic, referring, parts."""

from hiseg_jax.postprocess.boxes import box_cxcywh_to_xyxy
from hiseg_jax.postprocess.boxes import nms
from hiseg_jax.postprocess.boxes import pairwise_box_iou
from hiseg_jax.postprocess.instances import MASKED_LOGIT
from hiseg_jax.postprocess.instances import instance_boxes
from hiseg_jax.postprocess.instances import instance_masks
from hiseg_jax.postprocess.instances import instance_scores
from hiseg_jax.postprocess.instances import postprocess_instances
from hiseg_jax.postprocess.instances import select_instances
from hiseg_jax.postprocess.instances import thing_class_logits
from hiseg_jax.postprocess.panoptic import candidate_class_probs
from hiseg_jax.postprocess.panoptic import panoptic_inference
from hiseg_jax.postprocess.panoptic import postprocess_semantic_panoptic
from hiseg_jax.postprocess.panoptic import segment_masks
from hiseg_jax.postprocess.panoptic import segments_info
from hiseg_jax.postprocess.panoptic import semantic_inference
from hiseg_jax.postprocess.panoptic import stuff_class_logits
from hiseg_jax.postprocess.panoptic import thing_stuff_candidates
from hiseg_jax.postprocess.parts import InstancePart
from hiseg_jax.postprocess.parts import assemble_parts
from hiseg_jax.postprocess.parts import coarse_part_labels
from hiseg_jax.postprocess.parts import part_group_lookup
from hiseg_jax.postprocess.parts import part_query_mask
from hiseg_jax.postprocess.parts import ppp_part_groups
from hiseg_jax.postprocess.referring import referring_inference
from hiseg_jax.postprocess.resize import mask_logits_to_output
from hiseg_jax.postprocess.resize import nearest_resize

__all__ = [
    "InstancePart",
    "MASKED_LOGIT",
    "assemble_parts",
    "box_cxcywh_to_xyxy",
    "candidate_class_probs",
    "coarse_part_labels",
    "instance_boxes",
    "instance_masks",
    "instance_scores",
    "mask_logits_to_output",
    "nearest_resize",
    "nms",
    "pairwise_box_iou",
    "panoptic_inference",
    "part_group_lookup",
    "part_query_mask",
    "postprocess_instances",
    "postprocess_semantic_panoptic",
    "ppp_part_groups",
    "referring_inference",
    "segment_masks",
    "segments_info",
    "select_instances",
    "semantic_inference",
    "stuff_class_logits",
    "thing_class_logits",
    "thing_stuff_candidates",
]
