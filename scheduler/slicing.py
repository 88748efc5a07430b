"""Row slicing: how each matrix of the step is cut into instruction-sized pieces.

Every function returns [(row0, nrows)] in row order, contiguous, covering [0, total) once.
A slice holds a multiple of `align` rows (only the last may hold fewer, when total is not
a multiple) and at most `max_rows` rows (callers pass isa.MAX_ROWS_TIMES_BATCH // batch).
"""
from __future__ import annotations


def even_split(total: int, parts: int, align: int = 1,
               max_rows: int | None = None) -> list[tuple[int, int]]:
    """[0, total) in about `parts` slices as equal as `align` allows; more if max_rows binds."""
    units = -(-total // align)
    if max_rows is not None:
        max_units = max_rows // align
        if max_units < 1:
            raise ValueError(f"max_rows {max_rows} is below the alignment {align}")
        parts = max(parts, -(-units // max_units))
    parts = max(1, min(parts, units))
    bounds = [min(total, (k * units // parts) * align) for k in range(parts + 1)]
    return [(bounds[k], bounds[k + 1] - bounds[k]) for k in range(parts)]


def qkv_split(Hkv: int, group_rows: int, target: int, max_rows: int) -> list[tuple[int, int]]:
    """Even slices of the kv-group-major QKV matrix (Hkv groups of group_rows rows), cut on
    group boundaries: whole groups per slice when target < Hkv, else target // Hkv slices
    per group (more where max_rows binds)."""
    max_rows -= max_rows % 2
    per_group = max(target // Hkv, -(-group_rows // max_rows), 1)
    if per_group > 1 or target >= Hkv:
        inner = even_split(group_rows, per_group, 2, max_rows)
        return [(g * group_rows + r0, n) for g in range(Hkv) for r0, n in inner]
    groups_per_slice = min(-(-Hkv // target), max_rows // group_rows)
    parts = -(-Hkv // groups_per_slice)
    return [(g0 * group_rows, gn * group_rows) for g0, gn in even_split(Hkv, parts)]
