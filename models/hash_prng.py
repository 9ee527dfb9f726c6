"""A counter-based PRNG for random weights (`init_params`): each value a hash of its index and the key, through
murmur3's 32-bit finalizer. Registered with JAX (`jax.extend.random.define_prng_impl`), so Flax's initializers,
which split and fold keys per parameter, draw from it unchanged.

Why not JAX's own: XLA expands every `RngBitGenerator` (and Threefry's rounds) into thousands of integer operations
on the CPU, so a toy model's init program, one draw per parameter, compiled in 4-13 s, more than its forward pass;
with this hash it compiles in a fraction of that (docs/PERFORMANCE.md, "The test suite's time", session 35). The
values only need to look random: this is for test and benchmark weights, not for sampling (the engine's sampler keeps
JAX's Threefry keys)."""

import math

import jax
import jax.extend
import jax.numpy as jnp
from jax import lax


def _mix(x):
    """murmur3's 32-bit finalizer: each input bit flips each output bit with probability about 1/2."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _seed(seed):
    s = seed.astype(jnp.uint32)
    return jnp.stack([_mix(s ^ jnp.uint32(0x9E3779B9)), _mix(s + jnp.uint32(0x7F4A7C15))])


def _fold_in(key, data):
    d = _mix(jnp.asarray(data).astype(jnp.uint32) + jnp.uint32(0x632BE5AB))
    return jnp.stack([_mix(key[0] ^ d), _mix(key[1] + d)])


def _split(key, shape):
    i = lax.iota(jnp.uint32, math.prod(shape))
    return jnp.stack([_mix(key[0] ^ _mix(2 * i + 1)), _mix(key[1] ^ _mix(2 * i + 2))], -1).reshape(*shape, 2)


def _bits32(key, shape):
    i = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return _mix(_mix(i ^ key[0]) + key[1])


def _random_bits(key, bit_width, shape):
    shape = tuple(shape)
    if bit_width == 64:
        pair = _bits32(key, (*shape, 2)).astype(jnp.uint64)
        return (pair[..., 0] << 32) | pair[..., 1]
    bits = _bits32(key, shape)
    return bits if bit_width == 32 else (bits >> (32 - bit_width)).astype(jnp.dtype(f"uint{bit_width}"))


HASH = jax.extend.random.define_prng_impl(key_shape=(2,), seed=_seed, split=_split, random_bits=_random_bits,
                                          fold_in=_fold_in, name="murmur3-hash", tag="m3h")


def key(seed: int):
    """A key of this PRNG for `seed`."""
    return jax.random.key(seed, impl=HASH)
