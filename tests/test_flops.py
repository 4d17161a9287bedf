"""The analytic FLOP count: exact on known products, and within 5 % of XLA:CPU's count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from csce_jax.runs import state as train_state
from csce_jax.runs.builders import run_parts
from csce_jax.runtime import sharding
from csce_jax.train import flops
from csce_jax.train.step import make_train_step


def test_products_are_counted_exactly():
    x = jax.ShapeDtypeStruct((4, 16, 16, 8), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 8, 32), jnp.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert flops.count_flops(conv, x, w) == 2 * (4 * 8 * 8 * 32) * (3 * 3 * 8)
    a, b = jax.ShapeDtypeStruct((5, 7), jnp.float32), jax.ShapeDtypeStruct((7, 3), jnp.float32)
    nested = jax.jit(lambda a, b: jnp.tanh(a @ b) @ jnp.ones((3, 2)))
    assert flops.count_flops(nested, a, b) == 2 * 5 * 7 * 3 + 2 * 5 * 3 * 2


def test_mfu_needs_a_known_peak():
    assert flops.mfu(25e9, 1000.0, 1, None) is None
    assert flops.mfu(25e9, 1000.0, 2, 1e15) == pytest.approx(0.0125)
    assert flops.peak_flops(jax.devices()[0], "float32") is None  # a CPU: no invented peak


@pytest.mark.slow
def test_full_size_count_is_within_five_percent_of_xla_cpu():
    c = tiny_config(1)
    c.model.width, c.model.depths, c.data.crop, c.batch_size = 1.0, (3, 4, 6, 3), 224, 2
    ours = flops.model_flops_per_image(c, 100)["train"]
    mesh = jax.make_mesh(
        (1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,)
    )
    parts = run_parts(c, 100)
    setup = train_state.create_train_state(parts.model, parts.tx, parts.schedule)
    step = make_train_step(setup.graphdef, setup.tx, setup.schedule, parts.step, mesh)
    state = jax.device_put(setup.state, sharding.replicated(mesh))
    batch = sharding.global_batch(
        mesh, {"image": np.zeros((2, 224, 224, 3), np.uint8), "label": np.zeros(2, np.int32)}
    )
    cost = step.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla = cost["flops"] / 2
    assert 24e9 < ours < 28e9  # ResNet-50 plus the CSCE head, forward and backward
    assert abs(ours - xla) <= 0.05 * xla, (ours / 1e9, xla / 1e9)
