"""The checkpoint manager's keep rules: the latest N and the best, across restarts."""

import jax.numpy as jnp
import numpy as np

from csce_jax.runs.checkpoints import Checkpoints


def _state(value):
    return {
        "params": {"w": jnp.full((3,), value, jnp.float32)},
        "rest": {"b": jnp.zeros((2,), jnp.float32)},
        "opt": {"m": jnp.zeros((3,), jnp.float32)},
        "step": jnp.asarray(value, jnp.int32),
    }


def test_the_best_survives_restarts_and_ties_keep_the_earlier_step(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=1, async_save=False)
    ckpts.save(1, _state(1), {"best_step": None})
    ckpts.save(2, _state(2), {"best_step": 2}, score=0.7)
    ckpts.save(3, _state(3), {"best_step": 2})
    ckpts.close()
    assert Checkpoints(tmp_path, read_only=True).steps() == [2, 3]
    again = Checkpoints(tmp_path, keep=1, async_save=False)  # a restarted run
    again.save(4, _state(4), {"best_step": 2}, score=0.7)  # a tie: the earlier best stays
    again.save(5, _state(5), {"best_step": 2})
    again.close()
    reader = Checkpoints(tmp_path, read_only=True)
    assert reader.steps() == [2, 5] and reader.best_step() == 2
    _, weights, meta = reader.restore_weights(
        {"params": _state(0)["params"], "rest": _state(0)["rest"]}, 2
    )
    np.testing.assert_array_equal(np.asarray(weights["params"]["w"]), [2, 2, 2])
    assert meta["best_step"] == 2
