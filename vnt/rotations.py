"""Rotations in 3D: Haar-uniform random samples (batched), Euler angles (ZYZ), and the original
package's ``rot``."""
from __future__ import annotations

import torch
from torch import Tensor


def random_rotations(num: int, *, dtype: torch.dtype = torch.float64, device=None,
                     generator: torch.Generator | None = None) -> Tensor:
    """``num`` rotation matrices (num, 3, 3) drawn from the Haar (uniform) measure on SO(3).

    A standard normal 4-vector normalised is a uniform unit quaternion, and the map from unit
    quaternions to rotations pushes the uniform measure on S^3 to the Haar measure on SO(3).
    Sampled in float64, then cast.
    """
    q = torch.randn(num, 4, dtype=torch.float64, generator=generator)
    q = q / q.norm(dim=-1, keepdim=True)
    return quaternion_to_matrix(q).to(dtype=dtype, device=device)


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Unit quaternions (..., 4) as (w, x, y, z) -> rotation matrices (..., 3, 3)."""
    w, x, y, z = q.unbind(-1)
    m = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=-1)
    return m.reshape(*q.shape[:-1], 3, 3)


def rot_z(gamma: Tensor) -> Tensor:
    c, s, o, i = gamma.cos(), gamma.sin(), torch.zeros_like(gamma), torch.ones_like(gamma)
    return torch.stack([c, -s, o, s, c, o, o, o, i], dim=-1).reshape(*gamma.shape, 3, 3)


def rot_y(beta: Tensor) -> Tensor:
    c, s, o, i = beta.cos(), beta.sin(), torch.zeros_like(beta), torch.ones_like(beta)
    return torch.stack([c, o, s, o, i, o, -s, o, c], dim=-1).reshape(*beta.shape, 3, 3)


def euler_rotation(alpha, beta, gamma) -> Tensor:
    """R = Rz(alpha) Ry(beta) Rz(gamma); angles are floats or broadcastable tensors -> (..., 3, 3)."""
    alpha, beta, gamma = torch.broadcast_tensors(*(torch.as_tensor(a, dtype=torch.float64) for a in (alpha, beta, gamma)))
    return rot_z(alpha) @ rot_y(beta) @ rot_z(gamma)


def rot(alpha, beta, gamma) -> Tensor:
    """The original package's ``rot``: Rz(alpha) Ry(beta) Rz(gamma), a (3, 3) rotation in the angles'
    dtype (tensors), or the default dtype (Python numbers). Same as ``euler_rotation``, which works in
    float64 and broadcasts."""
    angles = [a for a in (alpha, beta, gamma) if isinstance(a, Tensor) and a.is_floating_point()]
    dtype = angles[0].dtype if angles else torch.get_default_dtype()
    return euler_rotation(*(torch.as_tensor(a).detach().double() for a in (alpha, beta, gamma))).to(dtype)
