"""Training losses.

Modules: `point_sampling` (bilinear point lookup, uniform and uncertainty point
selection), `mask_losses` (point-sampled BCE and dice), `objectness_loss`,
`association_loss` (AIMS Eq. 8), `aims_loss` (the AIMS set criterion), `box_losses` (L1, GIoU,
IoU head), `focal` (sigmoid and token focal) and `hipie_loss` (the HIPIE thing and stuff criteria).
Import them by module path; this package imports nothing, so
`hiseg_jax.matching` can use `point_sampling` without an import cycle.
"""
