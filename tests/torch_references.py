"""PyTorch transcriptions of reference modules, written for the tests (never used by the library).

Sources transcribed (facts, not code): Deformable DETR's `ms_deform_attn_core_pytorch` and
`MSDeformAttn`, Mask2Former's `PositionEmbeddingSine`, SOLOv2's `matrix_nms` (AdelaiDet).
"""

import math

import torch
import torch.nn.functional as F


def torch_ms_deform_attn_core(value, shapes, locations, weights):
  """Transcription of Deformable DETR's ms_deform_attn_core_pytorch (grid_sample based).

  Args:
    value: [B, S, Hh, Dh] tensor.
    shapes: ((H_l, W_l), ...) per level.
    locations: [B, Nq, Hh, L, P, 2] normalised (x, y).
    weights: [B, Nq, Hh, L, P].

  Returns:
    [B, Nq, Hh*Dh] tensor.
  """
  b, _, hh, dh = value.shape
  _, nq, _, n_levels, n_points, _ = locations.shape
  values = value.split([h * w for h, w in shapes], dim=1)
  grids = 2 * locations - 1
  samples = []
  for lvl, (h, w) in enumerate(shapes):
    v = values[lvl].flatten(2).transpose(1, 2).reshape(b * hh, dh, h, w)
    g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
    samples.append(F.grid_sample(v, g, mode='bilinear', padding_mode='zeros', align_corners=False))
  weights = weights.transpose(1, 2).reshape(b * hh, 1, nq, n_levels * n_points)
  out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(b, hh * dh, nq)
  return out.transpose(1, 2).contiguous()


class TorchMSDeformAttn(torch.nn.Module):
  """Transcription of Deformable DETR's MSDeformAttn (forward and init) over the core above.

  Args:
    d_model: model width.
    n_levels: feature levels.
    n_heads: attention heads.
    n_points: sampling points per head and level.
  """

  def __init__(self, d_model, n_levels, n_heads, n_points):
    super().__init__()
    self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
    self.sampling_offsets = torch.nn.Linear(d_model, n_heads * n_levels * n_points * 2)
    self.attention_weights = torch.nn.Linear(d_model, n_heads * n_levels * n_points)
    self.value_proj = torch.nn.Linear(d_model, d_model)
    self.output_proj = torch.nn.Linear(d_model, d_model)
    torch.nn.init.constant_(self.sampling_offsets.weight, 0.)
    thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(n_heads, 1, 1, 2)
    grid = grid.repeat(1, n_levels, n_points, 1)
    for i in range(n_points):
      grid[:, :, i, :] *= i + 1
    with torch.no_grad():
      self.sampling_offsets.bias.copy_(grid.view(-1))

  def forward(self, query, reference_points, input_flatten, shapes, padding_mask=None):
    """[B, Nq, D] queries, [B, Nq, L, 2|4] references, [B, S, D] features -> [B, Nq, D]."""
    n, nq, _ = query.shape
    _, s, _ = input_flatten.shape
    value = self.value_proj(input_flatten)
    if padding_mask is not None:
      value = value.masked_fill(padding_mask[..., None], float(0))
    value = value.view(n, s, self.n_heads, -1)
    offsets = self.sampling_offsets(query).view(n, nq, self.n_heads, self.n_levels,
                                                self.n_points, 2)
    attn = self.attention_weights(query).view(n, nq, self.n_heads, self.n_levels * self.n_points)
    attn = F.softmax(attn, -1).view(n, nq, self.n_heads, self.n_levels, self.n_points)
    shapes_t = torch.tensor(shapes)
    if reference_points.shape[-1] == 2:
      normalizer = torch.stack([shapes_t[..., 1], shapes_t[..., 0]], -1)
      loc = (reference_points[:, :, None, :, None, :]
             + offsets / normalizer[None, None, None, :, None, :])
    else:
      loc = (reference_points[:, :, None, :, None, :2]
             + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
    return self.output_proj(torch_ms_deform_attn_core(value, shapes, loc, attn))


def torch_sine_position_encoding(mask, num_pos_feats, temperature, normalize, scale):
  """Transcription of Mask2Former's PositionEmbeddingSine.forward.

  Args:
    mask: bool [B, H, W] tensor, True at padding.
    num_pos_feats: features per axis.
    temperature: frequency base.
    normalize: whether to normalise positions.
    scale: normalised range.

  Returns:
    float32 numpy [B, H, W, 2*num_pos_feats].
  """
  not_mask = ~mask
  y_embed = not_mask.cumsum(1, dtype=torch.float32)
  x_embed = not_mask.cumsum(2, dtype=torch.float32)
  if normalize:
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
  dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
  dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
  pos_x = x_embed[:, :, :, None] / dim_t
  pos_y = y_embed[:, :, :, None] / dim_t
  pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
  pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
  return torch.cat((pos_y, pos_x), dim=3).numpy()


def torch_matrix_nms(seg_masks, cate_scores, sigma=2.0):
  """SOLOv2 (AdelaiDet `matrix_nms`), class-agnostic, Gaussian kernel; masks sorted by score."""
  n = len(cate_scores)
  seg_masks = seg_masks.reshape(n, -1).float()
  inter = torch.mm(seg_masks, seg_masks.transpose(1, 0))
  sum_masks = seg_masks.sum(1).expand(n, n)
  iou = (inter / (sum_masks + sum_masks.transpose(1, 0) - inter)).triu(diagonal=1)
  compensate_iou, _ = iou.max(0)
  compensate_iou = compensate_iou.expand(n, n).transpose(1, 0)
  decay_matrix = torch.exp(-1 * sigma * (iou ** 2))
  compensate_matrix = torch.exp(-1 * sigma * (compensate_iou ** 2))
  decay_coefficient, _ = (decay_matrix / compensate_matrix).min(0)
  return cate_scores * decay_coefficient
