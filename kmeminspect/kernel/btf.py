"""The kernel's BTF (``CONFIG_DEBUG_INFO_BTF``): a parser of the raw format, with no drgn.

The format is the kernel's ``include/uapi/linux/btf.h``: a header, then the type section (one
``struct btf_type`` per type, numbered from 1, each followed by its kind's records), then the string
section. docs/decisions.md says why kmeminspect parses it itself; ``tests/test_btf.py`` checks the parse
against ``bpftool btf dump``.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import BinaryIO

import numpy as np

from ..errors import KmemError

MAGIC = 0xEB9F

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

#: BTF_INT_ENCODING bits of an INT's extra word
INT_SIGNED, INT_CHAR, INT_BOOL = 1, 2, 4

#: the bytes each record following a type takes, by kind (multiplied by vlen for the vlen kinds)
_VLEN_RECORD = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_FIXED_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}


class BtfError(KmemError):
    """The bytes are not BTF this parser understands (truncated, another byte order, a newer kind, a type
    id out of range): one line, as every bad input."""


@dataclasses.dataclass(frozen=True)
class Member:
    """A struct or union member: ``bit_offset`` from the start, ``bit_size`` when it is a bit field."""

    name: str | None
    type_id: int
    bit_offset: int
    bit_size: int | None


@dataclasses.dataclass(frozen=True)
class BtfType:
    """One type: its kind, name (None when anonymous), ``size`` (INT, STRUCT, UNION, ENUM*, FLOAT, DATASEC) or
    referenced ``type_id`` (PTR, TYPEDEF, qualifiers, FUNC, FUNC_PROTO's return, VAR, TYPE_TAG), and the
    kind's records: members, enumerators ``(name, value)``, parameters ``(name, type_id)``, or an array's
    ``(element type, length)``."""

    kind: int
    name: str | None
    size: int = 0
    type_id: int = 0
    kind_flag: bool = False
    members: tuple[Member, ...] = ()
    enumerators: tuple[tuple[str, int], ...] = ()
    parameters: tuple[tuple[str | None, int], ...] = ()
    array: tuple[int, int] = (0, 0)
    int_encoding: int = 0
    int_bits: int = 0


class Btf:
    """A BTF blob, decoded on demand: one pass finds where each type starts; :meth:`type` decodes one.

    A kernel's BTF has 100,000 and more types, of which a reader needs a few hundred."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("too short for a BTF header")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BtfError(f"not BTF (magic {magic:#06x}, want {MAGIC:#06x} little-endian)")
        if version != 1:
            raise BtfError(f"BTF version {version} (this parser reads version 1)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        types_start, strings_start = hdr_len + type_off, hdr_len + str_off
        if types_start + type_len > len(data) or strings_start + str_len > len(data):
            raise BtfError(f"BTF cut short ({len(data)} bytes, its header describes more)")
        if types_start % 4:
            raise BtfError(f"the type section starts at byte {types_start}, not on a 4-byte boundary")
        self.size = max(types_start + type_len, strings_start + str_len)
        self._data = data
        self._strings = data[strings_start : strings_start + str_len]
        self._offsets = self._scan(data, types_start, types_start + type_len)
        self._words = np.frombuffer(data, dtype="<u4", count=(types_start + type_len) // 4)
        self._name_offsets = self._words[self._offsets // 4]
        self._kinds = (self._words[self._offsets // 4 + 1] >> 24) & 0x1F
        self._name_offsets[0] = self._kinds[0] = 0  # void
        # before v6.0 (6089fb325cf7) an ENUM's values were signed and kind_flag unused; since, kind_flag
        # says signed, and ENUM64 exists: a BTF with neither is read the old way
        flagged = (self._words[self._offsets // 4 + 1] >> 31).astype(bool)
        self._signed_enums = not ((self._kinds == ENUM64).any() or (flagged & (self._kinds == ENUM)).any())
        self._cache: dict[int, BtfType] = {}
        self._enumerators: tuple[np.ndarray, np.ndarray] | None = None
        self._offsets_of: dict[bytes, int] | None = None
        self._repeats: dict[bytes, list[int]] = {}

    def __len__(self) -> int:
        """The number of types, void (id 0) included."""
        return len(self._offsets)

    @staticmethod
    def _scan(data: bytes, start: int, end: int) -> np.ndarray:
        """Where each type starts, in bytes (index = type id; id 0, void, has no record: 0)."""
        if (end - start) % 4:
            raise BtfError("the type section is not made of 4-byte words")
        words = memoryview(data)[start:end].cast("I")
        # in words: the 3 of struct btf_type, the kind's fixed extra, and its records per vlen
        fixed = [3 + _FIXED_EXTRA.get(kind, 0) // 4 for kind in range(32)]
        record = [_VLEN_RECORD.get(kind, 0) // 4 for kind in range(32)]
        known = set(range(INT, ENUM64 + 1))
        offsets = [0]
        pos, count = 0, len(words)
        while pos < count:
            offsets.append(pos)
            if pos + 2 >= count:
                raise BtfError("the type section ends inside a type")
            info = words[pos + 1]
            kind = (info >> 24) & 0x1F
            if kind not in known:
                raise BtfError(f"BTF kind {kind} unknown to this parser (a newer kernel?)")
            pos += fixed[kind] + record[kind] * (info & 0xFFFF)
        if pos != count:
            raise BtfError("the type section ends inside a type")
        result = np.array(offsets, dtype=np.int64) * 4 + start
        result[0] = 0
        return result

    def string(self, offset: int) -> str | None:
        """The NUL-terminated string at ``offset`` of the string section, None for offset 0 (anonymous)."""
        if offset == 0:
            return None
        end = self._strings.find(b"\0", offset)
        if offset >= len(self._strings) or end < 0:
            raise BtfError(f"string offset {offset} outside the string section")
        try:
            return self._strings[offset:end].decode()
        except UnicodeDecodeError:
            raise BtfError(f"the string at offset {offset} is not UTF-8") from None

    def kind(self, type_id: int) -> int:
        """The kind of type ``type_id`` (0 for void)."""
        return int(self._kinds[type_id]) if type_id else 0

    def type(self, type_id: int) -> BtfType:
        """Type ``type_id``, decoded (and kept)."""
        entry = self._cache.get(type_id)
        if entry is None:
            if not 0 < type_id < len(self._offsets):
                raise BtfError(f"type id {type_id} out of range (1 to {len(self._offsets) - 1})")
            entry = self._cache[type_id] = self._decode(int(self._offsets[type_id]))
        return entry

    def _decode(self, pos: int) -> BtfType:
        data, string, unpack = self._data, self.string, struct.unpack_from
        name_off, info, size_or_type = unpack("<III", data, pos)
        pos += 12
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        kind_flag = bool(info >> 31)
        name = string(name_off)
        if kind in (STRUCT, UNION):
            members = []
            for i in range(vlen):
                m_name, m_type, m_offset = unpack("<III", data, pos + 12 * i)
                if kind_flag:  # the bit field size in the top 8 bits of the offset
                    members.append(Member(string(m_name), m_type, m_offset & 0xFFFFFF, (m_offset >> 24) or None))
                else:
                    members.append(Member(string(m_name), m_type, m_offset, None))
            return BtfType(kind, name, size=size_or_type, kind_flag=kind_flag, members=tuple(members))
        if kind == ENUM:
            layout = "<Ii" if kind_flag or self._signed_enums else "<II"
            values = tuple((string(n) or "", v) for n, v in (unpack(layout, data, pos + 8 * i) for i in range(vlen)))
            return BtfType(kind, name, size=size_or_type, kind_flag=kind_flag, enumerators=values)
        if kind == ENUM64:
            values64 = []
            for i in range(vlen):
                n, low, high = unpack("<III", data, pos + 12 * i)
                value = (high << 32) | low
                if kind_flag and value >= 1 << 63:
                    value -= 1 << 64
                values64.append((string(n) or "", value))
            return BtfType(kind, name, size=size_or_type, kind_flag=kind_flag, enumerators=tuple(values64))
        if kind == FUNC_PROTO:
            params = tuple((string(n), t) for n, t in (unpack("<II", data, pos + 8 * i) for i in range(vlen)))
            return BtfType(kind, name, type_id=size_or_type, parameters=params)
        if kind == INT:
            (word,) = unpack("<I", data, pos)
            return BtfType(kind, name, size=size_or_type, int_encoding=(word >> 24) & 0xF, int_bits=word & 0xFF)
        if kind == ARRAY:
            element, _index, length = unpack("<III", data, pos)
            return BtfType(kind, name, array=(element, length))
        if kind in (FLOAT, DATASEC):
            return BtfType(kind, name, size=size_or_type)
        return BtfType(kind, name, type_id=size_or_type, kind_flag=kind_flag)

    def _string_offsets(self, name: str) -> list[int]:
        """Where ``name`` starts in the string section (pahole writes each string once; a hand-made BTF may
        repeat one)."""
        if self._offsets_of is None:
            texts = self._strings.split(b"\0")
            ends = np.flatnonzero(np.frombuffer(self._strings, dtype=np.uint8) == 0)
            starts = np.concatenate(([0], ends + 1))[: len(texts)].tolist()
            self._offsets_of = dict(zip(reversed(texts), reversed(starts), strict=True))  # the first of each
            if len(texts) - len(self._offsets_of) > max(texts.count(b"") - 1, 0):  # more than "" repeats
                for text, start in zip(texts, starts, strict=True):
                    if text and start != self._offsets_of[text]:
                        self._repeats.setdefault(text, []).append(start)
        first = self._offsets_of.get(name.encode())
        return [] if first is None else [first, *self._repeats.get(name.encode(), [])]

    def ids_named(self, name: str) -> list[int]:
        """The ids of every type called ``name`` (a struct, union or enum tag, a typedef, a base type, a
        function, a variable), in id order."""
        ids: list[int] = []
        for offset in self._string_offsets(name):
            if offset:
                ids.extend(np.flatnonzero(self._name_offsets == offset).tolist())
        return sorted(ids)

    def enumerator(self, name: str) -> tuple[int, int] | None:
        """``(enum type id, value)`` of the first enumerator called ``name``, or None."""
        if self._enumerators is None:
            self._enumerators = self._enumerator_names()
        names, owners = self._enumerators
        found = [int(i) for offset in self._string_offsets(name) if offset for i in np.flatnonzero(names == offset)[:1]]
        if not found:
            return None
        owner = int(owners[min(found)])
        return owner, dict(self.type(owner).enumerators)[name]

    def _enumerator_names(self) -> tuple[np.ndarray, np.ndarray]:
        """The name offset of every enumerator of every ENUM and ENUM64, and the id of its type (found
        without decoding a type: enumerator records follow their type's 12 bytes, 8 or 12 bytes each)."""
        ids = np.flatnonzero((self._kinds == ENUM) | (self._kinds == ENUM64))
        first_word = self._offsets[ids] // 4
        counts = (self._words[first_word + 1] & 0xFFFF).astype(np.int64)
        stride = np.where(self._kinds[ids] == ENUM, 2, 3)
        total = int(counts.sum())
        index_in_type = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        name_words = np.repeat(first_word + 3, counts) + index_in_type * np.repeat(stride, counts)
        return self._words[name_words], np.repeat(ids, counts)


def btf_from_elf(f: BinaryIO) -> bytes | None:
    """The ``.BTF`` section of an ELF64 little-endian file (a vmlinux, with or without DWARF: only the section
    headers and the section are read), or None when ``f`` is not such a file or has no ``.BTF``."""
    f.seek(0)
    head = f.read(64)
    if not head.startswith(b"\x7fELF") or len(head) < 64 or head[4] != 2:
        return None
    if head[5] != 1:  # EI_DATA: ELFDATA2LSB
        raise BtfError("a big-endian ELF file (kmeminspect reads x86_64 kernels)")
    e_shoff = struct.unpack_from("<Q", head, 40)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", head, 58)
    if e_shentsize < 64 or e_shstrndx >= e_shnum:
        return None
    f.seek(e_shoff)
    table = f.read(e_shentsize * e_shnum)
    if len(table) < e_shentsize * e_shnum:
        return None
    headers = [struct.unpack_from("<IIQQQQ", table, i * e_shentsize) for i in range(e_shnum)]
    f.seek(headers[e_shstrndx][4])
    names = f.read(headers[e_shstrndx][5])
    for sh_name, _type, _flags, _addr, offset, size in headers:
        if names[sh_name : names.find(b"\0", sh_name)] == b".BTF":
            f.seek(offset)
            data = f.read(size)
            return data if len(data) == size else None
    return None
