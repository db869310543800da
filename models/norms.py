"""RMSNorm and LayerNorm, computed in fp32 whatever the activation dtype."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.sharding import param_with_axes


class RMSNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D] in x.dtype."""
        scale = self.param("scale", param_with_axes(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D] in x.dtype."""
        d = x.shape[-1]
        scale = self.param("scale", param_with_axes(nn.initializers.ones, ("norm",)), (d,),
                           self.param_dtype)
        bias = self.param("bias", param_with_axes(nn.initializers.zeros, ("norm",)), (d,),
                          self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def make_norm(kind: str, eps: float, param_dtype: jnp.dtype, name: str) -> nn.Module:
    return {"rmsnorm": RMSNorm, "layernorm": LayerNorm}[kind](eps, param_dtype, name=name)
