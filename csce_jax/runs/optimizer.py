"""Optimisers: the release's RMSprop with PyTorch semantics, plus AdamW and SGD with schedules.

PyTorch's RMSprop differs from optax's defaults in three ways that change numbers:
weight decay is *coupled* (wd * p added to the gradient before anything else), eps is added
*after* the square root, and the squared average starts at 0 with decay alpha = 0.99.
"""

from __future__ import annotations

import jax
import optax


def torch_rmsprop(
    learning_rate: float | optax.Schedule,
    *,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """``torch.optim.RMSprop(lr, alpha, eps, weight_decay)`` (no momentum, not centred)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.scale_by_rms(decay=alpha, eps=eps, initial_scale=0.0, eps_in_sqrt=False),
        optax.scale_by_learning_rate(learning_rate),
    )


def learning_rate_schedule(
    base_lr: float, total_steps: int, *, warmup_steps: int = 0, decay: str = "constant"
) -> optax.Schedule:
    """Linear warm-up to ``base_lr`` then constant or cosine decay to 0 at ``total_steps``."""
    if decay == "constant":
        after = optax.constant_schedule(base_lr)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(base_lr, max(1, total_steps - warmup_steps))
    else:
        raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {decay!r}")
    if warmup_steps <= 0:
        return after
    warm = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warm, after], [warmup_steps])


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """``rmsprop`` (the release's, PyTorch semantics), ``adamw`` or ``sgd`` (momentum, coupled wd)."""
    if name == "rmsprop":
        return torch_rmsprop(learning_rate, weight_decay=weight_decay)
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
            optax.sgd(learning_rate, momentum=momentum),
        )
    raise ValueError(f"optimizer.name must be 'rmsprop', 'adamw' or 'sgd', got {name!r}")


def with_frozen(
    tx: optax.GradientTransformation, frozen: tuple[str, ...]
) -> optax.GradientTransformation:
    """``tx`` on every parameter except those under a top-level name in ``frozen`` (left as is).

    The release's threshold head gets no gradient, and PyTorch optimisers skip such parameters
    entirely (no weight decay either); freezing reproduces that exactly.
    """
    if not frozen:
        return tx

    def labels(tree):
        def label(path, _):
            top = path[0]
            name = getattr(top, "key", getattr(top, "name", None))
            return "frozen" if name in frozen else "train"

        return jax.tree_util.tree_map_with_path(label, tree)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
