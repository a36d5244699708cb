"""DP randomness from a CSPRNG: a ChaCha20 keystream (``cryptography``) behind numpy and torch.

Torch's generator is a Mersenne Twister: 624 consecutive outputs determine all later ones, so a
server that could read some of a node's noise could predict the rest. Opacus' ``secure_mode``
would draw from torchcsprng, which does not install here; `SecureRandom` draws every DP noise
value and every Poisson sampling decision from ChaCha20 keyed with 256 bits from
``os.urandom`` instead::

    source = SecureRandom()
    install_secure_noise(dp_optimizer, source)    # DP-SGD noise
    source.bernoulli_mask(n_students, sample_rate)  # who is in a batch (privacy.sampling)

Gaussian noise is drawn in float64 (Box-Muller on 53-bit uniforms) with the floating-point
mitigation of Opacus' secure mode: each value is the sum of four draws at the target standard
deviation, halved (``opacus.optimizers.optimizer._generate_noise``; Holohan & Braghin,
arXiv:2107.10138 §5.1 with n = 2), so the low bits of a released value no longer reveal which
Gaussian sample produced it (the attack of arXiv:2112.05307).
"""

from __future__ import annotations

import math
import os
import threading
import types
from collections.abc import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

__all__ = [
    "SecureRandom",
    "install_secure_noise",
]

KEY_BYTES = 32
# ChaCha20's block counter is 32 bits (256 GiB of keystream); rekeying every GiB, from the
# keystream itself, stays far from it and keeps a keyed (test) source deterministic.
_REKEY_BYTES = 1 << 30
# What the keystream encrypts, read in chunks of up to this size (never written).
_ZEROS = memoryview(bytes(1 << 20))
# Opacus' secure mode: 2n draws summed, n = 2, divided by sqrt(2n) = 2 to keep the variance.
_SECURE_DRAWS = 4


class SecureRandom:
    """Uniforms, Gaussians and Bernoulli masks from one ChaCha20 keystream; thread-safe.

    Args:
        key: 32 bytes; None (the only setting for real DP rounds) draws them from
            ``os.urandom``. A fixed key makes the stream reproducible, for tests only.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(KEY_BYTES)
        if len(key) != KEY_BYTES:
            raise ValueError(f"a ChaCha20 key is {KEY_BYTES} bytes, got {len(key)}")
        self._lock = threading.Lock()
        self._rekey(key)

    def _rekey(self, key: bytes) -> None:
        # The 16-byte "nonce" of cryptography's ChaCha20 is counter + nonce; one key, one stream.
        cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None)
        self._stream = cipher.encryptor()
        self._left = _REKEY_BYTES

    def random_bytes(self, n: int) -> bytes:
        """The next ``n`` bytes of the keystream."""
        if n < 0:
            raise ValueError(f"cannot draw {n} bytes")
        out = bytearray(n)
        self._fill(memoryview(out))
        return bytes(out)

    def _fill(self, out: memoryview) -> None:
        """Write the next ``len(out)`` bytes of the keystream into ``out``.

        The keystream is ChaCha20's encryption of zeros, written in place: no buffer is
        allocated per draw (each DP-SGD step draws hundreds of kB).
        """
        with self._lock:
            done, n = 0, len(out)
            while done < n:
                if self._left == 0:
                    self._rekey(self._stream.update(bytes(KEY_BYTES)))
                take = min(n - done, self._left, len(_ZEROS))
                self._stream.update_into(_ZEROS[:take], out[done : done + take])
                self._left -= take
                done += take

    def _words(self, n: int) -> np.ndarray:
        """The next ``8 n`` bytes of the keystream as ``n`` little-endian uint64 (writable)."""
        words = np.empty(n, dtype="<u8")
        self._fill(memoryview(words).cast("B"))
        return words

    def _grid(self, n: int) -> np.ndarray:
        """``n`` integers below 2**53 (int64), the 53 high bits of each 64-bit word."""
        words = self._words(n)
        words >>= np.uint64(11)
        return words.view(np.int64)  # signed: converts to float faster, the values fit

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms in [0, 1), each from 53 random bits (every multiple of 2**-53)."""
        u = self._grid(n).astype(np.float64)  # exact: integers below 2**53
        u *= 2.0**-53
        return u

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` float64 N(0, 1) draws (Box-Muller), without the floating-point mitigation."""
        pairs = (n + 1) // 2
        k = torch.from_numpy(self._grid(2 * pairs).astype(np.float64))
        # u = k 2**-53 is exact, and so is any further power-of-two scaling: -u and 2 pi u
        # come straight from k (the same values as from u). 1 - u lies in (0, 1]: the
        # logarithm is finite. numpy's float64 log1p and sqrt (correctly rounded; torch's is
        # faster but not), torch's cos and sin: the fastest of each here (the noise is part
        # of every DP-SGD step's cost).
        radius, angle = k.split(pairs)
        radius.mul_(-(2.0**-53))
        work = radius.numpy()
        np.log1p(work, out=work)
        work *= -2.0
        np.sqrt(work, out=work)
        angle.mul_(2.0 * math.pi * 2.0**-53)
        out = np.empty(2 * pairs)
        first, second = torch.from_numpy(out).split(pairs)
        torch.cos(angle, out=first).mul_(radius)
        torch.sin(angle, out=second).mul_(radius)
        return out[:n]

    def normal(
        self,
        shape: Sequence[int] | torch.Size,
        std: float,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Gaussian noise N(0, std**2) of ``shape``, with Opacus' secure-mode mitigation.

        Drawn and summed in float64, cast to ``dtype`` last. ``std == 0`` gives exact zeros.
        """
        if std < 0 or not math.isfinite(std):
            raise ValueError(f"the noise standard deviation must be finite and >= 0, got {std}")
        size = math.prod(shape)
        if std == 0 or size == 0:
            return torch.zeros(tuple(shape), dtype=dtype, device=device)
        draws = self.standard_normal(_SECURE_DRAWS * size).reshape(_SECURE_DRAWS, size)
        noise = draws.sum(axis=0) * (std / math.sqrt(_SECURE_DRAWS))
        return torch.from_numpy(noise.reshape(tuple(shape))).to(dtype=dtype, device=device)

    def bernoulli_mask(self, n: int, p: float) -> np.ndarray:
        """``n`` independent booleans, each True with probability ``p`` (Poisson sampling)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"a sampling probability lies in [0, 1], got {p}")
        return self.uniform(n) < p


def _split_normal(
    source: SecureRandom, refs: Sequence[torch.Tensor], std: float
) -> list[torch.Tensor]:
    """Noise shaped, typed and placed like each of ``refs``, from one draw of ``source``.

    One draw for all parameters, then split: each value is still four draws of its own (the
    parameters get disjoint stretches of the keystream), at a fraction of the per-call cost of
    one draw per parameter.
    """
    sizes = [ref.numel() for ref in refs]
    flat = source.normal((sum(sizes),), std)
    kinds = {(ref.dtype, ref.device) for ref in refs}
    if len(kinds) == 1:  # the usual case: one conversion (and one copy to a GPU) for all
        dtype, device = kinds.pop()
        flat = flat.to(dtype=dtype, device=device)
        return [part.view(ref.shape) for part, ref in zip(flat.split(sizes), refs, strict=True)]
    return [
        part.view(ref.shape).to(dtype=ref.dtype, device=ref.device)
        for part, ref in zip(flat.split(sizes), refs, strict=True)
    ]


def install_secure_noise(optimizer: DPOptimizer, source: SecureRandom) -> None:
    """Make ``optimizer`` draw its DP-SGD noise from ``source`` instead of torch's generator.

    Replaces ``DPOptimizer.add_noise`` on this instance with the same semantics: noise of
    standard deviation ``noise_multiplier * max_grad_norm`` added to each parameter's clipped
    ``summed_grad`` into ``p.grad`` (scaling to the expected batch size follows in
    ``scale_grad``, unchanged). The noise of all parameters is drawn at once and split.
    """

    def add_noise(self: DPOptimizer) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        refs = []
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            refs.append(p.summed_grad)
        for p, ref, noise in zip(self.params, refs, _split_normal(source, refs, std), strict=True):
            p.grad = (ref + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = types.MethodType(add_noise, optimizer)  # type: ignore[method-assign]
    # Nothing may fall back to torch's generator by accident.
    optimizer.generator = None
    optimizer.noise_source = source  # type: ignore[attr-defined]
