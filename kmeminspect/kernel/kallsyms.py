"""Kernel symbols from the kallsyms tables in a dump's memory, found one name at a time.

drgn's own loader (``drgn.helpers.linux.kallsyms``) decodes every name (210,000 on 7.3: over a second). The
readers need about thirty. So this reads the tables once (a few MB), computes every symbol's decoded
length and byte sum with arrays, and decodes only the entries whose length and sum fit a wanted name.
The tables are the ones VMCOREINFO points to (v6.0+, f09bddbd8661).

Addresses have been encoded four ways, all tried; the one that gives VMCOREINFO's own ``_stext`` (and
every other symbol both have) is used, as drgn does (drgn#601):

- absolute: ``kallsyms_addresses[i]`` (before v4.6, or without KALLSYMS_BASE_RELATIVE);
- base-relative: ``kallsyms_relative_base + (u32)kallsyms_offsets[i]`` (v4.6, 2213e9a66bb8);
- base-relative with absolute per-cpu symbols: a non-negative offset is the address, a negative one
  ``kallsyms_relative_base - 1 - offset`` (x86_64 until per-cpu symbols became relative);
- place-relative: ``&kallsyms_offsets[i] + kallsyms_offsets[i]`` (v7.0, a081b5789255d).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
from drgn import Program, Symbol, SymbolBinding, SymbolKind


def binding_and_kind(letter: str) -> tuple[SymbolBinding, SymbolKind]:
    """A kallsyms type letter (nm's) as drgn's own kallsyms loader reads it."""
    binding, kind = SymbolBinding.UNKNOWN, SymbolKind.UNKNOWN
    if letter in "vV":
        binding, kind = SymbolBinding.WEAK, SymbolKind.OBJECT
    elif letter in "wW":
        binding = SymbolBinding.WEAK
    elif letter in "tT":
        kind = SymbolKind.FUNC
    elif letter.lower() in "srbgncd":
        kind = SymbolKind.OBJECT
    if binding == SymbolBinding.UNKNOWN and letter.isupper():
        binding = SymbolBinding.GLOBAL
    return binding, kind


class KallsymsError(LookupError):
    """The kallsyms tables are not there (before v6.0, or not in VMCOREINFO) or not understood."""


class Kallsyms:
    """The kallsyms of the kernel in ``prog``, from the tables whose addresses ``vmcoreinfo`` gives
    (``SYMBOL(kallsyms_names)`` and the others): a drgn symbol finder (``__call__``)."""

    def __init__(self, prog: Program, vmcoreinfo: dict[str, str]) -> None:
        def symbol(name: str) -> int | None:
            value = vmcoreinfo.get(f"SYMBOL({name})")
            return int(value, 16) if value else None

        names_at, tokens_at = symbol("kallsyms_names"), symbol("kallsyms_token_table")
        index_at, count_at = symbol("kallsyms_token_index"), symbol("kallsyms_num_syms")
        if not (names_at and tokens_at and index_at and count_at) or not names_at < tokens_at < index_at:
            raise KallsymsError("VMCOREINFO does not locate the kallsyms tables (a kernel before 6.0?)")
        self.count = int.from_bytes(prog.read(count_at, 4), "little")
        # kallsyms_names comes first; the markers (and sequences) between it and the token table are not read
        self._raw_names = prog.read(names_at, tokens_at - names_at)
        self._names = np.frombuffer(self._raw_names, dtype=np.uint8)
        table = prog.read(tokens_at, index_at - tokens_at)
        starts = np.frombuffer(prog.read(index_at, 512), dtype="<u2").tolist()
        self._tokens = [table[s : table.index(b"\0", s)] for s in starts]
        self._starts, self._ends = self._entries()
        self._lengths, self._sums = self._shapes()
        self._addresses = self._decode_addresses(prog, symbol)
        self._order = np.argsort(self._addresses, kind="stable")
        self._sorted = self._addresses[self._order].tolist()
        self._rank = np.empty(self.count, dtype=np.int64)
        self._rank[self._order] = np.arange(self.count)

    def _entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Where each entry's tokens start and end in kallsyms_names (a length byte, two when the top bit
        is set: names longer than 127 tokens, v6.1 73bbb94466fd)."""
        names = memoryview(self._raw_names)
        starts, ends = [], []
        pos = 0
        for _ in range(self.count):
            length = names[pos]
            if length & 0x80:
                length = (length & 0x7F) | (names[pos + 1] << 7)
                pos += 2
            else:
                pos += 1
            starts.append(pos)
            pos += length
            ends.append(pos)
        if pos > len(names):
            raise KallsymsError("kallsyms_names ends before its last entry")
        return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)

    def _shapes(self) -> tuple[np.ndarray, np.ndarray]:
        """Each entry's decoded length and byte sum (its type letter included), without decoding it."""
        token_lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        token_sums = np.array([sum(t) for t in self._tokens], dtype=np.int64)
        end = int(self._ends[-1]) if self.count else 0
        inside = np.zeros(end + 1, dtype=np.int64)
        np.add.at(inside, self._starts, 1)
        np.add.at(inside, self._ends, -1)
        inside = np.cumsum(inside[:end]).astype(bool)  # the length bytes between entries count for nothing
        codes = self._names[:end]
        lengths = np.add.reduceat(token_lengths[codes] * inside, self._starts) if self.count else np.zeros(0)
        sums = np.add.reduceat(token_sums[codes] * inside, self._starts) if self.count else np.zeros(0)
        return lengths, sums

    def _decode(self, i: int) -> bytes:
        """Entry ``i``: its type letter, then its name."""
        tokens = self._tokens
        return b"".join(tokens[t] for t in self._names[self._starts[i] : self._ends[i]].tolist())

    def _decode_addresses(self, prog: Program, symbol: Callable[[str], int | None]) -> np.ndarray:
        """Every entry's address, in the encoding that gives VMCOREINFO's ``_stext`` and the other symbols
        VMCOREINFO names (``init_uts_ns``, ``node_data``)."""
        known = {name: symbol(name) for name in ("_stext", "init_uts_ns", "node_data")}
        entries = {name: self._indexes(name.encode()) for name, address in known.items() if address}
        if not entries.get("_stext"):
            raise KallsymsError("neither VMCOREINFO nor kallsyms has _stext to check kallsyms addresses against")
        for candidate in self._candidate_addresses(prog, symbol):
            if all(any(int(candidate[i]) == known[name] for i in found) for name, found in entries.items() if found):
                return candidate
        raise KallsymsError("no kallsyms address encoding gives VMCOREINFO's _stext")

    def _candidate_addresses(self, prog: Program, symbol: Callable[[str], int | None]) -> list[np.ndarray]:
        """The addresses in each encoding the tables allow (see the module's docstring)."""
        count = self.count
        candidates = []
        absolute_at = symbol("kallsyms_addresses")
        if absolute_at:
            candidates.append(np.frombuffer(prog.read(absolute_at, 8 * count), dtype="<u8").copy())
        offsets_at = symbol("kallsyms_offsets")
        if offsets_at:
            offsets = np.frombuffer(prog.read(offsets_at, 4 * count), dtype="<i4").astype(np.int64)
            wrap = np.uint64(0xFFFFFFFFFFFFFFFF)
            place = (np.int64(offsets_at - (1 << 64) if offsets_at >= 1 << 63 else offsets_at)
                     + 4 * np.arange(count, dtype=np.int64) + offsets)  # fmt: skip
            candidates.append(place.astype(np.uint64) & wrap)
            base_at = symbol("kallsyms_relative_base")
            if base_at:
                base = int.from_bytes(prog.read(base_at, 8), "little")
                relative = (np.uint64(base) + (offsets & 0xFFFFFFFF).astype(np.uint64)) & wrap
                candidates.append(relative)
                negative = offsets < 0
                below = np.uint64(base) - np.uint64(1) - offsets.astype(np.uint64)
                candidates.append(np.where(negative, below, offsets.astype(np.uint64)))
        return candidates

    def _indexes(self, name: bytes) -> list[int]:
        """The entries whose name (after the type letter) is ``name``."""
        wanted_sum = sum(name)
        # the type letter is one of a-z, A-Z: its code is the rest of the sum
        fits = np.flatnonzero(
            (self._lengths == len(name) + 1) & (self._sums - wanted_sum >= 65) & (self._sums - wanted_sum <= 122)
        )
        return [i for i in fits.tolist() if self._decode(i)[1:] == name]

    def _symbol(self, i: int) -> Symbol:
        """Entry ``i`` as a drgn Symbol; its size reaches the next symbol in address order (0 for all but
        the last of symbols sharing an address), as drgn's loader computes it."""
        text = self._decode(i)
        address = int(self._addresses[i])
        rank = int(self._rank[i])
        size = self._sorted[rank + 1] - address if rank + 1 < len(self._sorted) else 0
        binding, kind = binding_and_kind(chr(text[0]))
        return Symbol(text[1:].decode(errors="replace"), address, size, binding, kind)

    def __call__(self, prog: Program, name: str | None, address: int | None, one: bool) -> list[Symbol]:
        """drgn's symbol finder callback: by name, by address (the symbol whose [start, start + size)
        holds it), both, or every symbol."""
        if name is not None:
            found = [self._symbol(i) for i in self._indexes(name.encode())]
            if address is not None:
                found = [s for s in found if s.address <= address < s.address + s.size]
        elif address is not None:
            rank = bisect.bisect_right(self._sorted, address) - 1
            found = [self._symbol(int(self._order[rank]))] if rank >= 0 else []
            found = [s for s in found if address < s.address + s.size]
        else:
            found = [self._symbol(i) for i in range(self.count)]
        if one and found:
            return [min(found, key=lambda s: s.binding != SymbolBinding.GLOBAL)]
        return found
