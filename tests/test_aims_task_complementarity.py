"""Tests for the AIMS task complementarity module against a torch transcription of Eq. 5-6."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from hiseg_jax.aims.task_complementarity import TaskComplementarityBlock

# float32, same operations in a different order: agreement to 1e-5 absolute.
ATOL = 1e-5
D, HEADS, FFN = 32, 4, 64


class TorchPairModule(torch.nn.Module):
  """Concat -> post-norm self-attention -> post-norm FFN -> split (Eq. 5)."""

  def __init__(self):
    super().__init__()
    self.attn = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
    self.norm1 = torch.nn.LayerNorm(D)
    self.linear1 = torch.nn.Linear(D, FFN)
    self.linear2 = torch.nn.Linear(FFN, D)
    self.norm2 = torch.nn.LayerNorm(D)
    with torch.no_grad():
      for p in (self.attn.in_proj_bias, self.attn.out_proj.bias, self.norm1.weight,
                self.norm1.bias, self.norm2.weight, self.norm2.bias):
        p.normal_()

  def forward(self, high, low, high_pos, low_pos):
    x = torch.cat([high, low], dim=1)
    pos = torch.cat([high_pos, low_pos], dim=1)
    qk = x + pos
    x = self.norm1(x + self.attn(qk, qk, x, need_weights=False)[0])
    x = self.norm2(x + self.linear2(torch.relu(self.linear1(x))))
    return x[:, :high.shape[1]], x[:, high.shape[1]:]

  def flax_params(self):
    t = lambda p: jnp.asarray(p.detach().numpy())
    w, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
    attn = {name: {'kernel': t(w[i * D:(i + 1) * D]).T, 'bias': t(bias[i * D:(i + 1) * D])}
            for i, name in enumerate(('q_proj', 'k_proj', 'v_proj'))}
    attn['out_proj'] = {'kernel': t(self.attn.out_proj.weight).T,
                        'bias': t(self.attn.out_proj.bias)}
    norm = lambda n: {'scale': t(n.weight), 'bias': t(n.bias)}
    linear = lambda l: {'kernel': t(l.weight).T, 'bias': t(l.bias)}
    return {'self_attn': {'attn': attn, 'norm': norm(self.norm1)},
            'ffn': {'linear1': linear(self.linear1), 'linear2': linear(self.linear2),
                    'norm': norm(self.norm2)}}


def test_tcm_block_matches_torch_transcription():
  b, counts = 2, {'part': 7, 'entity': 5, 'relation': 3}
  rng = np.random.default_rng(0)
  emb = {k: rng.normal(size=(b, q, D)).astype(np.float32) for k, q in counts.items()}
  pos = {k: rng.normal(size=(b, q, D)).astype(np.float32) for k, q in counts.items()}
  torch.manual_seed(0)
  ep, re = TorchPairModule(), TorchPairModule()
  tt = {k: torch.from_numpy(v) for k, v in emb.items()}
  tp = {k: torch.from_numpy(v) for k, v in pos.items()}
  e_ep, p_ep = ep(tt['entity'], tt['part'], tp['entity'], tp['part'])
  r_re, e_re = re(tt['relation'], tt['entity'], tp['relation'], tp['entity'])
  expected = {'part': tt['part'] + p_ep, 'entity': tt['entity'] + e_ep + e_re,
              'relation': tt['relation'] + r_re}  # Eq. 6, entity in both modules

  block = TaskComplementarityBlock(num_heads=HEADS, ffn_dim=FFN)
  init = block.init(jax.random.PRNGKey(0), emb, pos)
  params = {'params': {'ep': ep.flax_params(), 're': re.flax_params()}}
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
  out = block.apply(params, emb, pos)
  for k in counts:
    assert out[k].shape == (b, counts[k], D)
    np.testing.assert_allclose(np.asarray(out[k]), expected[k].detach().numpy(), atol=ATOL)
