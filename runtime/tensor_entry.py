"""The chunked tensors of a bundle's index (spec §4.1): `TensorEntry`, one tensor with its tier layouts,
and `validate_tensors`, the reader's check of the index's `tensors` list at open (every rule of §5 that
concerns them, payload ids claimed through the bundle)."""

from __future__ import annotations

import numpy as np

from .errors import corrupt as _fail
from .format import MAX_GROUP_SIZE, TIERS
from .schema import check_name, check_shape, check_tensor_facts, check_zp_tiers
from .tiers import NESTED, SEPARATE, ZERO_POINT, ZERO_POINT_T, TierLayout, TransposedZeroPointTier, ZeroPointTier


class TensorEntry:
    """One chunked weight tensor of the index: rows (neurons, channels, embedding rows) split into chunks."""

    __slots__ = ("name", "kind", "shape", "rows", "row_len", "group_size", "bounds", "tiers", "errors", "meta",
                 "layouts")

    def __init__(self, d: dict):
        self.name = d["name"]
        self.kind = d["kind"]
        self.shape = tuple(d["shape"])
        self.rows = self.shape[0]
        self.row_len = int(np.prod(self.shape[1:], dtype=np.int64))
        self.group_size = d["group_size"]
        self.bounds = np.asarray(d["bounds"], dtype=np.int64)
        self.errors = d.get("errors", {})
        self.meta = d
        # tier -> (layout, payload-id lists); `tiers` maps every tier, nested ones too, to its first
        # list, so policies see what is available and empty chunks (-1) as empty. Nested planes are
        # added by the validation (`_check_nested`, `add_layout`).
        self.tiers: dict[str, np.ndarray] = {}
        self.layouts: dict[str, tuple[TierLayout, list[np.ndarray]]] = {}
        for t, pids in d["tiers"].items():
            self.add_layout(SEPARATE[t], [pids])
        for t, pids in d.get(ZeroPointTier.index_key, {}).items():  # (1.2) integer-zero-point tiers
            self.add_layout(ZERO_POINT[t], [pids])
        for t, pids in d.get(TransposedZeroPointTier.index_key, {}).items():  # (1.3) the same over transposes
            self.add_layout(ZERO_POINT_T[t], [pids])

    def add_layout(self, layout: TierLayout, ids: list) -> None:
        ids = [np.asarray(p, dtype=np.int64) for p in ids]
        for t in layout.tiers_of(ids):
            self.layouts[t] = (layout, ids)
            self.tiers[t] = ids[0]

    @property
    def planes(self) -> list[np.ndarray]:
        """The nested bit-plane id lists (A, B, C), [] when the tensor has none."""
        return next((ids for layout, ids in self.layouts.values() if layout is NESTED), [])

    def chunk_pids(self, tier: str, i: int) -> list[int]:
        """Every payload id chunk i at `tier` is decoded from (one, or 1-3 nested planes); [] if empty."""
        layout, ids = self.layouts[tier]
        return layout.chunk_pids(ids, tier, i)

    @property
    def n_chunks(self) -> int:
        return len(self.bounds) - 1

    def chunk_rows(self, i: int) -> int:
        return int(self.bounds[i + 1] - self.bounds[i])

    def effective_group(self, layout: TierLayout) -> int:
        return layout.group(self.row_len, self.group_size)

    def payload_nbytes(self, tier: str, i: int) -> int:
        """Raw bytes a read of chunk i at `tier` takes (every payload it needs)."""
        layout = self.layouts[tier][0]
        return layout.nbytes(tier, self.chunk_rows(i), self.row_len, self.effective_group(layout))

    def chunk_nbytes(self, tier: str) -> np.ndarray:
        """`payload_nbytes` of every chunk at `tier` (one computation per distinct chunk height)."""
        layout = self.layouts[tier][0]
        heights, where = np.unique(np.diff(self.bounds), return_inverse=True)
        g = self.effective_group(layout)
        return np.array([layout.nbytes(tier, int(r), self.row_len, g) for r in heights], np.int64)[where]

    def payload_sizes(self, layout: TierLayout, i: int) -> list[int]:
        """Raw length of each of chunk i's payloads in `layout`."""
        return layout.payload_sizes(self.chunk_rows(i), self.row_len, self.effective_group(layout))


def validate_tensors(bundle, tensors, used: set) -> dict[str, TensorEntry]:
    """The index's `tensors` as {name: TensorEntry}; payload ids are claimed in `used` (Bundle.claim_payload)."""
    if not isinstance(tensors, list):
        _fail("'tensors' must be a list")
    out: dict[str, TensorEntry] = {}
    for d in tensors:
        if not isinstance(d, dict):
            _fail("tensor entry must be an object")
        name = check_name(d.get("name"), "tensor name")
        if name in out:
            _fail(f"tensor {name} listed twice")
        if not isinstance(d.get("kind"), str):
            _fail(f"tensor {name}: missing kind")
        shape = d.get("shape")
        if check_shape(shape, f"tensor {name}") == 0 or len(shape) < 2:
            _fail(f"tensor {name}: a chunked tensor needs rank >= 2 and no zero dims")
        g = d.get("group_size")
        if type(g) is not int or not 1 <= g <= MAX_GROUP_SIZE:
            _fail(f"tensor {name}: bad group_size {g!r}")
        b = d.get("bounds")
        if (not isinstance(b, list) or len(b) < 2 or any(type(x) is not int for x in b)
                or b[0] != 0 or b[-1] != shape[0] or any(y <= x for x, y in zip(b, b[1:]))):
            _fail(f"tensor {name}: chunk bounds must rise strictly from 0 to {shape[0]}")
        tiers = d.get("tiers")
        nested = d.get("nested")
        zp = check_zp_tiers(d, f"tensor {name}")
        zp_t = check_zp_tiers(d, f"tensor {name}", key=TransposedZeroPointTier.index_key)  # (1.3)
        if (not isinstance(tiers, dict) or not (tiers or zp or zp_t or nested is not None)
                or any(t not in TIERS for t in tiers)):
            _fail(f"tensor {name}: tiers must be a non-empty subset of {TIERS}")
        if set(tiers) & set(zp):
            _fail(f"tensor {name}: tier stored both in tiers and in zp")
        if set(zp_t) & (set(tiers) | set(zp)):
            _fail(f"tensor {name}: tier stored both in zp_t and in tiers or zp")
        separate = [*tiers.items(), *zp.items(), *zp_t.items()]
        for t, pids in separate:
            if not isinstance(pids, list) or len(pids) != len(b) - 1:
                _fail(f"tensor {name}: tier {t} must list one payload per chunk")
            # ids are checked before TensorEntry turns them into int64 arrays
            bundle.claim_payloads(pids, f"tensor {name} tier {t}", used, allow_empty=True)
        e = TensorEntry(d)
        for t, _ in separate:
            p = e.tiers[t]
            bad = np.flatnonzero((p >= 0) & (bundle.table["raw"][np.maximum(p, 0)].astype(np.int64) != e.chunk_nbytes(t)))
            if bad.size:
                _fail(f"tensor {name} tier {t} chunk {int(bad[0])}: payload length does not match the layout")
        if nested is not None:
            _check_nested(bundle, e, nested, used)
        check_tensor_facts(d, e.n_chunks, set(e.tiers), f"tensor {name}")
        out[name] = e
    return out


def _check_nested(bundle, e: TensorEntry, nested, used: set) -> None:
    """(1.1) `nested` = {"planes": [A ids, B ids, C ids]} (a prefix of 1-3 planes), spec §4.2b."""
    name, n = e.name, e.n_chunks
    planes = nested.get("planes") if isinstance(nested, dict) else None
    if not isinstance(planes, list) or not 1 <= len(planes) <= NESTED.n_payloads:
        _fail(f"tensor {name}: nested must be an object with a list of 1 to {NESTED.n_payloads} planes")
    if any(t in e.layouts for t in NESTED.tiers_of(planes)):
        _fail(f"tensor {name}: tier stored both separately and as nested planes")
    for p, pids in enumerate(planes):
        if not isinstance(pids, list) or len(pids) != n:
            _fail(f"tensor {name}: nested plane {'ABC'[p]} must list one payload per chunk")
        for i, pid in enumerate(pids):
            if type(pid) is not int:
                _fail(f"tensor {name}: nested plane {'ABC'[p]}: payload id {pid!r} out of range")
            if (pid < 0) != (planes[0][i] < 0):
                _fail(f"tensor {name} chunk {i}: an empty chunk must be empty (-1) in every nested plane")
            if bundle.claim_payload(pid, f"tensor {name} nested plane {'ABC'[p]}", used, allow_empty=True) >= 0:
                if int(bundle.table["raw"][pid]) != e.payload_sizes(NESTED, i)[p]:
                    _fail(f"tensor {name} nested plane {'ABC'[p]} chunk {i}: payload length does not match the layout")
    e.add_layout(NESTED, planes)
