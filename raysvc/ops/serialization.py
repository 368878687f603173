"""Space-filling-curve serialization of integer grid coordinates (PTv3's point order).

Bit conventions match the public PTv3 implementation, so that a model trained elsewhere sees the same order:
- z (Morton): bit i of x, y, z goes to code bit 3i+2, 3i+1, 3i (x most significant within each triple).
- hilbert: Skilling's transpose algorithm (AIP Conf. Proc. 707, 2004) over `depth` bits per axis, axis 0 the most
  significant within each triple, then Gray decoding of the interleaved word.
- "-trans" orders swap x and y before encoding.
- With a batch index, code = batch << (3 * depth) | code, so events never interleave. `serialize_by_event` gives
  each event its own depth, so that its order does not depend on the other events in the batch.
On CPU, encoding runs the numba kernels of `cpu_kernels` (one pass per point). Elsewhere (`_encode_levels`) it is a
state machine over bit levels, with Skilling's transform and the Gray decoding folded into 48-state tables that
consume four levels per step: a fixed number of ops for every point at its own depth; `_encode_torch`, the
transform written out as vectorised bit operations, is the reference both are tested against.
"""

from __future__ import annotations

import torch

from raysvc.ops import cpu_kernels
from raysvc.ops.paths import cpu_path
from raysvc.ops.ranges import assert_range_async

ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")


_SPREAD = (
    (32, 0x1F00000000FFFF),
    (16, 0x1F0000FF0000FF),
    (8, 0x100F00F00F00F00F),
    (4, 0x10C30C30C30C30C3),
    (2, 0x1249249249249249),
)


def _spread3(v: torch.Tensor, depth: int) -> torch.Tensor:
    """Move bit i of v to bit 3i (magic-mask bit spreading, valid up to 21 bits)."""
    v = v & ((1 << depth) - 1)
    for shift, mask in _SPREAD:
        v = (v | (v << shift)) & mask
    return v


def _gather3(code: torch.Tensor, depth: int) -> torch.Tensor:
    """Inverse of _spread3: bit 3i of code -> bit i."""
    v = code & _SPREAD[-1][1]
    for (shift, _), (_, mask) in zip(reversed(_SPREAD), list(reversed(_SPREAD))[1:] + [(0, 0x1FFFFF)], strict=True):
        v = (v | (v >> shift)) & mask
    return v & ((1 << depth) - 1)


def _interleave(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, depth: int) -> torch.Tensor:
    return (_spread3(x, depth) << 2) | (_spread3(y, depth) << 1) | _spread3(z, depth)


def _deinterleave(code: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gather3(code >> 2, depth), _gather3(code >> 1, depth), _gather3(code, depth)


def _skilling(axes: list[torch.Tensor], depth: int, inverse: bool) -> list[torch.Tensor]:
    """Skilling's axes <-> transposed-Hilbert transform. Each step only touches bits below the level it reads, so
    the inverse is the same steps in reverse order."""
    x = list(axes)
    steps = [(b, d) for b in range(depth - 1, -1, -1) for d in range(3)]  # levels from the most significant bit
    for b, d in reversed(steps) if inverse else steps:
        lower = (1 << b) - 1
        on = ((x[d] >> b) & 1).bool()
        if d == 0:
            x[0] = torch.where(on, x[0] ^ lower, x[0])
        else:
            t = (x[0] ^ x[d]) & lower
            x[0], x[d] = torch.where(on, x[0] ^ lower, x[0] ^ t), torch.where(on, x[d], x[d] ^ t)
    return x


def _gray_to_binary(g: torch.Tensor, bits: int) -> torch.Tensor:
    shift = 1
    while shift < bits:
        g = g ^ (g >> shift)
        shift <<= 1
    return g


def _hilbert_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Skilling's transform plus the Gray decoding as a state machine over bit levels, from the most significant:
    (next state * 8, 3-bit code digit), each indexed by state * 8 + the level's octant (bit of x, y, z -> 4, 2, 1).
    A state is what the levels above did to the axes of the lower bits (a permutation and a flip mask: Skilling's
    steps only invert x0 or swap the lower bits of x0 and x1 / x2) and the parity of the Gray bits above (the Gray
    decoding is a prefix XOR from the top)."""
    states = [((0, 1, 2), 0, 0)]  # (axis permutation, flip mask bit per axis, Gray parity)
    index, nxt, digit = {states[0]: 0}, {}, {}
    while len(nxt) < len(states) * 8:
        for s in list(states):
            perm, flip, parity = s
            for octant in range(8):
                if (index[s], octant) in nxt:
                    continue
                bits = [(octant >> (2 - a)) & 1 for a in range(3)]
                v = [bits[perm[a]] ^ ((flip >> a) & 1) for a in range(3)]  # the transformed bits at this level
                p, f = list(perm), [(flip >> a) & 1 for a in range(3)]
                for d in range(3):
                    if v[d]:
                        f[0] ^= 1  # invert the lower bits of x0
                    elif d:
                        p[0], p[d], f[0], f[d] = p[d], p[0], f[d], f[0]  # swap the lower bits of x0 and xd
                b2 = parity ^ v[0]
                b1 = b2 ^ v[1]
                b0 = b1 ^ v[2]
                new = (tuple(p), f[0] | f[1] << 1 | f[2] << 2, b0)
                if new not in index:
                    index[new] = len(states)
                    states.append(new)
                nxt[index[s], octant] = index[new]
                digit[index[s], octant] = b2 << 2 | b1 << 1 | b0
    n = len(states)
    next8 = torch.tensor([nxt[i // 8, i % 8] * 8 for i in range(n * 8)])
    return next8, torch.tensor([digit[i // 8, i % 8] for i in range(n * 8)])


_CHUNK = 4  # bit levels the device path's Hilbert encoder consumes per step (tables of 48 x 8^4 entries)


def _chunk_tables(chunk: int = _CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """`_hilbert_tables` composed over `chunk` levels: (next state * 8^chunk, 3*chunk-bit code digits), indexed by
    state * 8^chunk + the chunk's octants (the Morton digits of those levels, the top level's most significant)."""
    next8, digit_of = _hilbert_tables()
    width = 8**chunk
    group = torch.arange(width)
    state = torch.arange(len(next8) // 8)[:, None].expand(-1, width)
    digits = torch.zeros_like(state)
    for level in range(chunk - 1, -1, -1):
        idx = state * 8 + ((group >> 3 * level) & 7)
        digits = (digits << 3) | digit_of[idx]
        state = next8[idx] // 8
    return (state * width).reshape(-1), digits.reshape(-1)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_MORTON: dict[tuple[torch.device, int], torch.Tensor] = {}


def _morton(c: torch.Tensor, levels: int) -> torch.Tensor:
    """z-order code of (N, 3) coordinates below 2^levels: bit b of x, y, z -> code bit 3b+2, 3b+1, 3b."""
    key = (c.device, levels)
    if key not in _MORTON:  # (3, levels) how far each coordinate bit moves up to its code bit
        shifts = 3 * torch.arange(levels)[None, :] + torch.tensor([[2], [1], [0]])
        _MORTON[key] = (shifts - torch.arange(levels)[None, :]).to(c.device)
    bits = c[:, :, None] & (1 << torch.arange(levels, device=c.device))  # (N, 3, levels), each bit in place
    return (bits << _MORTON[key]).sum((1, 2))


def _encode_levels(c: torch.Tensor, depth: torch.Tensor | int, levels: int, order: str) -> torch.Tensor:
    """The device path's encoder: a fixed number of ops for every point at its own `depth` (an int, or (N,) per
    point), for any mix of depths up to `levels`. Equal to `_encode_torch` at each point's depth.

    Hilbert: Skilling's transform and the Gray decoding are a state machine over bit levels from a point's top level
    down (`_hilbert_tables`), run `_CHUNK` levels per step. A point of depth d is shifted up to the top of the
    chunked range and its code shifted back down: the levels below it are zeros that only append digits."""
    if order.endswith("-trans"):
        c = c[:, [1, 0, 2]]
    if order.startswith("z"):  # bits above a point's depth are zero: its depth changes nothing
        return _morton(c, levels)
    top = -(-levels // _CHUNK) * _CHUNK
    pad = top - torch.as_tensor(depth, device=c.device)
    code = _morton(c << (pad[:, None] if pad.ndim else pad), top)
    if c.device not in _TABLES:
        _TABLES[c.device] = tuple(t.to(c.device) for t in _chunk_tables())
    next_state, digit_of = _TABLES[c.device]
    out = state = None
    for shift in range(3 * (top - _CHUNK), -1, -3 * _CHUNK):  # chunks from the top
        idx = (code >> shift) & (8**_CHUNK - 1)
        if state is not None:
            idx = idx + state
        digits = digit_of[idx]
        out = digits if out is None else (out << 3 * _CHUNK) | digits
        if shift:
            state = next_state[idx]
    return out >> 3 * pad


def _check(grid_coord: torch.Tensor, depth: int) -> torch.Tensor:
    if not 1 <= depth <= 16:
        raise ValueError(f"depth must be in [1, 16] (3*depth code bits + batch bits fit in int64), got {depth}")
    if grid_coord.ndim != 2 or grid_coord.shape[1] != 3:
        raise ValueError(f"grid_coord must be (N, 3), got {tuple(grid_coord.shape)}")
    c = grid_coord.long()
    if not c.numel():
        return c
    if not cpu_path(c):  # checked on the device: reading the bounds back would stall the host
        assert_range_async(c, 0, 1 << depth, "grid coordinates out of [0, 2^depth)")
    elif c.min() < 0 or c.max() >= (1 << depth):
        raise ValueError(f"grid coordinates must lie in [0, 2^{depth}); got [{int(c.min())}, {int(c.max())}]")
    return c


def encode(
    grid_coord: torch.Tensor,
    batch: torch.Tensor | None = None,
    depth: int = 16,
    order: str = "z",
) -> torch.Tensor:
    """int64 codes of (N, 3) non-negative integer grid coordinates; batch index above the 3*depth code bits."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    c = _check(grid_coord, depth)
    if cpu_path(c):
        kernel = cpu_kernels.encode_z if order.startswith("z") else cpu_kernels.encode_hilbert
        code = torch.from_numpy(kernel(c.contiguous().numpy(), depth, order.endswith("-trans")))
    else:
        code = _encode_levels(c, depth, depth, order)
    if batch is not None:
        code = (batch.long() << (3 * depth)) | code
    return code


def _encode_torch(c: torch.Tensor, depth: int, order: str) -> torch.Tensor:
    """Whole-array torch version of the encoders (the path on GPUs; the reference the CPU kernels are tested
    against)."""
    if order.endswith("-trans"):
        c = c[:, [1, 0, 2]]
    x, y, z = c[:, 0], c[:, 1], c[:, 2]
    if order.startswith("z"):
        return _interleave(x, y, z, depth)
    tx, ty, tz = _skilling([x, y, z], depth, inverse=False)
    return _gray_to_binary(_interleave(tx, ty, tz, depth), 3 * depth)


def decode(code: torch.Tensor, depth: int = 16, order: str = "z") -> tuple[torch.Tensor, torch.Tensor]:
    """(grid_coord (N, 3), batch (N,)) from codes made by `encode` with the same depth and order."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    code = code.long()
    batch = code >> (3 * depth)
    code = code & ((1 << (3 * depth)) - 1)
    if order.startswith("z"):
        x, y, z = _deinterleave(code, depth)
    else:
        gray = code ^ (code >> 1)
        x, y, z = _skilling(list(_deinterleave(gray, depth)), depth, inverse=True)
    grid = torch.stack([x, y, z], dim=1)
    if order.endswith("-trans"):
        grid = grid[:, [1, 0, 2]]
    return grid, batch


def serialize(
    grid_coord: torch.Tensor,
    batch: torch.Tensor,
    depth: int,
    order: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code, order, inverse): points sorted by code, and the permutation back (order[inverse] == arange)."""
    return sort_codes(encode(grid_coord, batch, depth, order))


def point_depths(grid_coord: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """(N,) the depth of each point's event (`event_depths`), computed on the device without reading it back."""
    c = grid_coord.long()
    b = batch.long()
    top = torch.zeros(len(c), dtype=torch.long, device=c.device)  # at least as many rows as events
    top.scatter_reduce_(0, b, c.max(1).values, "amax")
    powers = 1 << torch.arange(16, device=c.device)
    return (top[b, None] >= powers).sum(1) + 1  # bit length + 1


def event_depths(grid_coord: torch.Tensor, batch: torch.Tensor) -> list[int]:
    """Each event's depth: the bit length of its largest grid coordinate + 1 (PTv3's rule, applied per event)."""
    if not len(grid_coord):
        return []
    c = grid_coord.long()
    b = batch.long()
    top = torch.zeros(int(b.max()) + 1, dtype=torch.long, device=c.device)
    top.scatter_reduce_(0, b, c.max(1).values, "amax")
    return [max(int(m).bit_length() + 1, 1) for m in top.tolist()]


def batch_depths(grid_coord: torch.Tensor, batch: torch.Tensor) -> list[int] | torch.Tensor:
    """One depth for every event of the batch, the reference implementation's rule: bit_length(max grid_coord + 1)
    over the whole batch. On the CPU a list per event; on a device (N,) per point, without reading it back."""
    c = grid_coord.long()
    if not len(c):
        return []
    if cpu_path(c):
        return [max(int(c.max() + 1).bit_length(), 1)] * (int(batch.max()) + 1)
    powers = 1 << torch.arange(17, device=c.device)
    return ((c.max() + 1) >= powers).sum().expand(len(c))


def serialize_by_event(
    grid_coord: torch.Tensor,
    batch: torch.Tensor,
    order: str,
    depths: list[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`serialize` with each event at its own depth (`event_depths`, or per point `point_depths`, computed unless
    given), batch index above 3*16 bits. PTv3 takes one depth from the whole batch; a Hilbert curve of another depth
    orders the same points differently, so an event's order, and the model's answer, would depend on the events
    batched with it. The device path encodes every depth at once in a fixed number of ops per bit level."""
    return sort_codes(codes_by_event(grid_coord, batch, order, depths))


def codes_by_event(
    grid_coord: torch.Tensor,
    batch: torch.Tensor,
    order: str,
    depths: list[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The codes `serialize_by_event` sorts by."""
    if not cpu_path(grid_coord):
        if depths is None:
            depths = point_depths(grid_coord, batch)
        elif isinstance(depths, list):
            depths = torch.tensor(depths, device=grid_coord.device)[batch.long()]
        code = _encode_levels(_check(grid_coord, 16), depths, 16, order)
        return (batch.long() << (3 * 16)) | code
    if depths is None:
        depths = event_depths(grid_coord, batch)
    if len(set(depths)) <= 1:
        code = encode(grid_coord, None, depths[0] if depths else 1, order)
    else:
        per_point = torch.tensor(depths, device=grid_coord.device)[batch.long()]
        code = torch.empty(len(grid_coord), dtype=torch.long, device=grid_coord.device)
        for d in set(depths):
            sel = per_point == d
            code[sel] = encode(grid_coord[sel], None, d, order)
    return (batch.long() << (3 * 16)) | code


def coarsen_codes(code: torch.Tensor, inverse: torch.Tensor, cells: int, levels: int) -> torch.Tensor:
    """`serialize_by_event`'s codes of the cells of a pooling by 2**levels (cell = grid >> levels; `inverse`: each
    point's cell, of `cells`) from its points' codes, with no curve encoded again. Both curves are hierarchical: a
    point's code without its lowest `levels` bit levels is its cell's code at `levels` less depth, and an event's
    per-event depth (bit length of its largest coordinate + 1) drops by exactly that much (an event whose cells are
    all at 0 has code 0 either way: its top level is the spare zero one). Not for the batch-depth rule, whose depth
    can stay the same."""
    low = code & ((1 << (3 * 16)) - 1)
    parent = (code - low) | (low >> (3 * levels))  # the batch index above 3*16 bits stays
    return torch.empty(cells, dtype=code.dtype, device=code.device).scatter_(0, inverse, parent)


def sort_codes(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code, perm, inverse): points sorted by code, and the permutation back; also for codes made elsewhere
    (`coarsen_codes`)."""
    perm = torch.argsort(code)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return code, perm, inverse
