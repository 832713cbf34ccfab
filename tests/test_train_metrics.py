"""The trainer's FLOP count (model FLOPs of a step's jaxpr): exact for matrix products,
convolutions and loops, and equal to XLA's own count of the compiled CPU program for a real
step (on GPU XLA's count misses the library calls, so the trainer uses this one)."""
import jax
import jax.numpy as jnp

from unclip_jax.train.metrics import compiled_flops, model_flops


def test_counts_matmuls_convs_and_loops():
    a, b = jnp.ones((4, 8)), jnp.ones((8, 3))
    assert model_flops(jax.make_jaxpr(lambda a, b: a @ b)(a, b)) == 2 * 4 * 8 * 3
    x, k = jnp.ones((2, 10, 10, 3)), jnp.ones((3, 3, 3, 5))
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert model_flops(jax.make_jaxpr(conv)(x, k)) == 2 * (2 * 10 * 10 * 5) * (3 * 3 * 3)

    def loop(a, b):
        return jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=7)[1]
    assert model_flops(jax.make_jaxpr(jax.jit(loop))(a, b)) == 7 * 2 * 4 * 8 * 3
    # the gradient of a matmul is two more matmuls of the same size
    grad = jax.grad(lambda a, b: jnp.sum(a @ b), argnums=(0, 1))
    assert model_flops(jax.make_jaxpr(grad)(a, b)) == 3 * 2 * 4 * 8 * 3


def test_agrees_with_xla_on_cpu_for_a_network_step():
    x = jnp.ones((8, 16, 16, 4))
    k1, k2 = jnp.ones((3, 3, 4, 16)) * 0.1, jnp.ones((16 * 16 * 16, 10)) * 0.01

    def loss(k1, k2, x):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, k1, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return jnp.mean((h.reshape(8, -1) @ k2) ** 2)

    traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(k1, k2, x)
    ours, xla = model_flops(traced.jaxpr), compiled_flops(traced.lower().compile())
    assert abs(ours - xla) / xla < 0.1, (ours, xla)
