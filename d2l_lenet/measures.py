"""What Santurkar et al. (2018) measure to ask how batch norm helps: covariate shift, smoothness.

S. Santurkar, D. Tsipras, A. Ilyas, A. Madry, "How Does Batch Normalization
Help Optimization?", NeurIPS 2018. Both measures take the loss as a function of
the parameters alone, ``loss_fn(params) -> scalar``, with the batch (and, for a
BN network in training mode, its batch statistics and any noise) held fixed,
so that before and after are compared on the same batch.

* `covariate_shift` (their Definition 2.1): for layer i, the gradient of the
  loss w.r.t. layer i's parameters before (``G``) and after (``G'``) the layers
  below it take their update, all other layers as they were: ``||G - G'||_2``
  and ``cos(G, G')``.
* `gradient_landscape` (their Figures 4 and 5): along ``w - eta * g`` for a set
  of step sizes ``eta``, the loss and the l2 change of the gradient; the
  *effective beta-smoothness* is the largest ``||g(w - eta g) - g(w)|| / ||eta g||``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]
LossFn = Callable[[Params], jax.Array]


def tree_dot(a: Any, b: Any) -> jax.Array:
  """The inner product of two pytrees of the same structure, in float32 or wider."""
  products = jax.tree.map(lambda x, y: jnp.vdot(x, y).real, a, b)
  return sum(jax.tree.leaves(products), jnp.float32(0))


def tree_norm(a: Any) -> jax.Array:
  """The l2 norm of a pytree (all its leaves as one vector)."""
  return jnp.sqrt(tree_dot(a, a))


def covariate_shift(
  loss_fn: LossFn, params: Params, new_params: Params, layers: Sequence[Sequence[str]]
) -> dict[str, jax.Array]:
  """Internal covariate shift of each layer, as Santurkar et al.'s Definition 2.1.

  Args:
    loss_fn: the loss as a function of ``params`` (a dict of top-level keys).
    params: the parameters at step t, ``W^(t)``.
    new_params: the parameters after the step's update, ``W^(t+1)``.
    layers: the layers from the input up, each a group of top-level keys of
      ``params`` that move together (e.g. ``('conv1', 'bn1')``).

  Returns:
    ``'l2'``, ``'relative_l2'`` and ``'cosine'``, each (len(layers),): for
    layer i, ``||G_i - G'_i||``, that over ``||G_i||``, and ``cos(G_i, G'_i)``,
    where ``G_i`` is the gradient w.r.t. layer i at ``params`` and ``G'_i`` the
    same with layers 0..i-1 taken from ``new_params``. Layer 0 has nothing
    below it: 0, 0 and 1.
  """
  grad_fn = jax.grad(loss_fn)
  before = grad_fn(params)
  l2, relative, cosine = [], [], []
  for i, group in enumerate(layers):
    below = {key for lower in layers[:i] for key in lower}
    mixed = {key: new_params[key] if key in below else value for key, value in params.items()}
    after = grad_fn(mixed)
    g, g_new = [{key: tree[key] for key in group} for tree in (before, after)]
    diff = jax.tree.map(jnp.subtract, g_new, g)
    l2.append(tree_norm(diff))
    relative.append(l2[-1] / tree_norm(g))
    cosine.append(tree_dot(g, g_new) / (tree_norm(g) * tree_norm(g_new)))
  return {'l2': jnp.stack(l2), 'relative_l2': jnp.stack(relative), 'cosine': jnp.stack(cosine)}


def gradient_landscape(
  loss_fn: LossFn, params: Params, step_sizes: Sequence[float] | jax.Array
) -> dict[str, jax.Array]:
  """The loss and the gradient along the gradient direction, as Santurkar et al.'s Figure 4.

  With ``g`` the gradient at ``params`` and ``eta`` each of ``step_sizes``:

  Returns:
    ``'loss'`` (S,): the loss at ``w - eta g``; ``'gradient_change'`` (S,):
    ``||g(w - eta g) - g||``; ``'loss_range'``: max minus min of ``'loss'``
    (with the loss at w itself); ``'gradient_predictiveness'``: the largest
    ``'gradient_change'``; ``'beta_smoothness'``: the effective
    beta-smoothness, the largest ``||g(w - eta g) - g|| / (eta ||g||)``; and
    ``'grad_norm'``: ``||g||``. Step sizes must be positive.
  """
  value_and_grad = jax.value_and_grad(loss_fn)
  loss0, g = value_and_grad(params)
  grad_norm = tree_norm(g)
  step_sizes = jnp.asarray(step_sizes, jnp.float32)

  def along(eta):
    loss, g_eta = value_and_grad(jax.tree.map(lambda w, d: w - eta * d, params, g))
    return loss, tree_norm(jax.tree.map(jnp.subtract, g_eta, g))

  losses, changes = jax.lax.map(along, step_sizes)
  all_losses = jnp.concatenate([loss0[None], losses])
  return {
    'loss': losses,
    'gradient_change': changes,
    'loss_range': jnp.max(all_losses) - jnp.min(all_losses),
    'gradient_predictiveness': jnp.max(changes),
    'beta_smoothness': jnp.max(changes / (step_sizes * grad_norm)),
    'grad_norm': grad_norm,
  }
