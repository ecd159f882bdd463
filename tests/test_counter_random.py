"""Counter-based uniforms (GradDrop's per-coordinate U(0, 1), DARE's masks share the hash)."""

import jax
import numpy as np

from mtl_jax.counter_random import counter_uniform


def test_counter_uniform_is_uniform_independent_of_position_and_fixed_by_the_key():
    n = 1 << 20
    u = np.asarray(jax.jit(lambda k: counter_uniform(k, (n,)))(jax.random.key(3)), np.float64)
    assert u.min() >= 0.0 and u.max() < 1.0
    # moments of U(0, 1): mean 1/2 (std error 2.8e-4), variance 1/12
    assert abs(u.mean() - 0.5) < 2e-3 and abs(u.var() - 1.0 / 12.0) < 1e-3
    counts = np.histogram(u, bins=64, range=(0.0, 1.0))[0]
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
    assert chi2 < 120  # 63 degrees of freedom: P(chi2 > 120) < 1e-5
    # neighbouring entries uncorrelated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5e-3
    # fixed by the key, different across keys, any impl; shape respected
    again = np.asarray(counter_uniform(jax.random.key(3), (n,)))
    other = np.asarray(counter_uniform(jax.random.key(4), (n,)))
    assert np.array_equal(u.astype(np.float32), again) and np.mean(np.abs(other - again) > 0) > 0.99
    assert counter_uniform(jax.random.key(0, impl="rbg"), (3, 5)).shape == (3, 5)
