"""The bulk decode (one key word per page, fields per run) against a per-page reference decode.

Synthetic struct pages only: that the decode reads real kernels right is what the VM tests
(test_readers.py) check. This checks the runs equal those of decoding every page on its own, on page
mixes the walk meets: initialized pages, all-zero and all-ones ones, PageOffline, ZONE_DEVICE pages, and
vmemmap pages that could not be read next to read ones.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import layout

from kmeminspect.kernel.layout import PageFormat
from kmeminspect.kernel.memmap import MemmapReader
from kmeminspect.state import MEMMAP_NOT_IN_DUMP, MEMMAP_READ, MEMMAP_UNMAPPED, runs_from_arrays

ZONES_PGOFF, NODES_PGOFF = 51, 54
PG_RESERVED, PG_HWPOISON, PG_SELF_HOSTED = 12, 22, 25
PAGE_TYPE_OFFSET = 48
OFFLINE_MAPCOUNT = -257
ZONE_DEVICE = 4


def page_format(offline_type_byte: int | None) -> PageFormat:
    return PageFormat(
        size=64,
        refcount_offset=52,
        page_type_offset=PAGE_TYPE_OFFSET,
        compound_offset=8,
        compound_is_mask=False,
        pgmap_offset=8,
        zones_pgoff=ZONES_PGOFF,
        zones_mask=7,
        nodes_pgoff=NODES_PGOFF,
        nodes_mask=1023,
        pg_reserved=PG_RESERVED,
        pg_head=16,
        pg_hwpoison=PG_HWPOISON,
        pg_self_hosted=PG_SELF_HOSTED,
        offline_type_byte=offline_type_byte,
        offline_mapcount_value=None if offline_type_byte is not None else OFFLINE_MAPCOUNT,
    )


def reference_columns(fmt: PageFormat, words: np.ndarray, state: np.ndarray, pgmap_of: np.ndarray) -> dict:
    """Every field of every page decoded on its own, in plain Python."""
    names = ["memmap", "zone_id", "nid", "reserved", "offline", "self_hosted", "hwpoison", "zeroed", "poisoned"]
    columns: dict[str, list[int]] = {name: [] for name in [*names, "pgmap"]}
    for i, row in enumerate(words.tolist()):
        read = state[i] == MEMMAP_READ
        flags = row[0]
        page_type = (row[PAGE_TYPE_OFFSET // 8] >> 8 * (PAGE_TYPE_OFFSET % 8)) & 0xFFFFFFFF
        if fmt.offline_type_byte is not None:
            offline = page_type >> 24 == fmt.offline_type_byte
        else:
            offline = page_type == OFFLINE_MAPCOUNT & 0xFFFFFFFF
        zone = flags >> ZONES_PGOFF & 7
        values = {
            "memmap": int(state[i]),
            "zone_id": zone if read else -1,
            "nid": flags >> NODES_PGOFF & 1023 if read else -1,
            "reserved": read and flags >> PG_RESERVED & 1,
            "offline": read and offline,
            "self_hosted": read and flags >> PG_SELF_HOSTED & 1,
            "hwpoison": read and flags >> PG_HWPOISON & 1,
            "zeroed": read and not any(row),
            "poisoned": read and flags == (1 << 64) - 1,
            "pgmap": int(pgmap_of[i]) if read and zone == ZONE_DEVICE else 0,
        }
        for name, value in values.items():
            columns[name].append(int(value))
    dtypes = {"zone_id": np.int8, "nid": np.int16, "pgmap": np.uint64}
    return {name: np.array(values, dtype=dtypes.get(name, np.uint8)) for name, values in columns.items()}


def flags_word(zone: int, nid: int, bits: int) -> int:
    return nid << NODES_PGOFF | zone << ZONES_PGOFF | bits


PAGE_KINDS = {
    "normal": lambda: [flags_word(2, 0, 0)] + [0] * 7,
    "reserved": lambda: [flags_word(1, 0, 1 << PG_RESERVED | 1 << 3)] + [0] * 7,
    "other-node": lambda: [flags_word(3, 1, 1 << PG_HWPOISON)] + [5] * 7,
    "self-hosted": lambda: [flags_word(2, 0, 1 << PG_SELF_HOSTED)] + [0] * 7,
    "zeroed": lambda: [0] * 8,
    "flags-zero-only": lambda: [0, 7] + [0] * 6,
    "dma-unflagged": lambda: [flags_word(0, 0, 1 << 2)] + [0] * 7,
    "poisoned": lambda: [(1 << 64) - 1] * 8,
    "all-stored-bits": lambda: (
        [flags_word(7, 1023, 1 << PG_RESERVED | 1 << PG_HWPOISON | 1 << PG_SELF_HOSTED)] + [0] * 7
    ),
    "device": lambda: [flags_word(ZONE_DEVICE, 0, 1 << PG_RESERVED)] + [0] * 7,
}


def with_page_type(row: list[int], page_type: int) -> list[int]:
    row = list(row)
    row[PAGE_TYPE_OFFSET // 8] = row[PAGE_TYPE_OFFSET // 8] & ~0xFFFFFFFF | page_type
    return row


pages = st.lists(
    st.tuples(
        st.sampled_from(sorted(PAGE_KINDS)),
        st.booleans(),  # PageOffline
        st.sampled_from([MEMMAP_READ] * 4 + [MEMMAP_UNMAPPED, MEMMAP_NOT_IN_DUMP]),
        st.integers(min_value=1, max_value=70),  # how many such pages in a row
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(pages, st.sampled_from([None, 0xF5]))
def test_bulk_decode_equals_per_page_decode(
    mix: list[tuple[str, bool, int, int]], offline_type_byte: int | None
) -> None:
    fmt = page_format(offline_type_byte)
    offline_type = (offline_type_byte << 24 | 0x12) if offline_type_byte is not None else OFFLINE_MAPCOUNT & 0xFFFFFFFF
    rows, states = [], []
    for kind, offline, state, count in mix:
        row = PAGE_KINDS[kind]()
        if offline:
            row = with_page_type(row, offline_type)
        if state != MEMMAP_READ:
            row = [0] * 8  # read_pages leaves what it could not read as zeros
        rows += [row] * count
        states += [state] * count
    words = np.array(rows, dtype="<u8")
    state = np.array(states, dtype=np.uint8)
    pgmap_of = np.arange(words.shape[0], dtype=np.uint64) // 3 + 0xFFFF888000000000
    reader = MemmapReader(None, layout(), fmt)  # type: ignore[arg-type]  # decode_runs never reads

    runs = reader.decode_runs(1000, words, state, lambda indexes: pgmap_of[indexes])

    expected = runs_from_arrays(1000, reference_columns(fmt, words, state, pgmap_of))
    assert runs.dtype == expected.dtype
    assert runs.tolist() == expected.tolist()
