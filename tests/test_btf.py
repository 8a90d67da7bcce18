"""Reading without a debug package: the kernel's own BTF, kallsyms and VMCOREINFO (docs/btf.md).

On every generation: the BTF kmeminspect finds in a dump is the ``.BTF`` section of that build's vmlinux,
and the parse agrees with ``bpftool btf dump`` on every type; a snapshot read in BTF mode equals the one
read with DWARF in every scenario; the BPF programs get the same offsets and argument positions; and the
command line takes BTF from a dump, from a file, and refuses another build's.
"""

from __future__ import annotations

import collections
import functools
import json
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import drgn
import pytest
from conftest import GENERATIONS, SCENARIOS, get_kernel
from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms
from test_audit import Injector
from vmfixtures import truth

from kmeminspect import audit
from kmeminspect import snapshot as snapshot_mod
from kmeminspect.kernel import btf as b
from kmeminspect.kernel import read_snapshot
from kmeminspect.kernel.btf_types import DECLARATIONS, btf_in_memory, parse_vmcoreinfo
from kmeminspect.kernel.kallsyms import Kallsyms
from kmeminspect.kernel.probepoints import argument_positions, bpf_constants
from kmeminspect.target import open_vmcore, types_mode
from kmeminspect.trace.plan import PROBED_PARAMETERS

REPO = Path(__file__).resolve().parent.parent

KIND_NAMES = {
    b.INT: "INT", b.PTR: "PTR", b.ARRAY: "ARRAY", b.STRUCT: "STRUCT", b.UNION: "UNION", b.ENUM: "ENUM",
    b.FWD: "FWD", b.TYPEDEF: "TYPEDEF", b.VOLATILE: "VOLATILE", b.CONST: "CONST", b.RESTRICT: "RESTRICT",
    b.FUNC: "FUNC", b.FUNC_PROTO: "FUNC_PROTO", b.VAR: "VAR", b.DATASEC: "DATASEC", b.FLOAT: "FLOAT",
    b.DECL_TAG: "DECL_TAG", b.TYPE_TAG: "TYPE_TAG", b.ENUM64: "ENUM64",
}  # fmt: skip
INT_ENCODINGS = {0: "(none)", b.INT_SIGNED: "SIGNED", b.INT_CHAR: "CHAR", b.INT_BOOL: "BOOL"}


@functools.cache
def vmlinux_btf(generation: str) -> bytes:
    """The ``.BTF`` section of the generation's vmlinux (the file the -dbg package ships)."""
    with open(get_kernel(generation).vmlinux, "rb") as f:
        data = b.btf_from_elf(f)
    assert data is not None, "the vmlinux has no .BTF section"
    return data


def bpftool_view(entry: b.BtfType) -> dict[str, Any]:
    """One parsed type in the shape of ``bpftool -j btf dump``'s entry (the fields both have)."""
    view: dict[str, Any] = {"kind": KIND_NAMES[entry.kind], "name": entry.name or "(anon)"}
    kind = entry.kind
    if kind == b.INT:
        view |= {"size": entry.size, "nr_bits": entry.int_bits, "encoding": INT_ENCODINGS[entry.int_encoding]}
    elif kind in (b.STRUCT, b.UNION):
        members = []
        for m in entry.members:
            member = {"name": m.name or "(anon)", "type_id": m.type_id, "bits_offset": m.bit_offset}
            if m.bit_size is not None:
                member["bitfield_size"] = m.bit_size
            members.append(member)
        view |= {"size": entry.size, "members": members}
    elif kind in (b.ENUM, b.ENUM64):
        view |= {"size": entry.size, "values": [{"name": n, "val": v} for n, v in entry.enumerators]}
    elif kind == b.ARRAY:
        view |= {"type_id": entry.array[0], "nr_elems": entry.array[1]}
    elif kind == b.FUNC_PROTO:
        params = [{"name": n or "(anon)", "type_id": t} for n, t in entry.parameters]
        view |= {"ret_type_id": entry.type_id, "params": params}
    elif kind == b.FWD:
        view |= {"fwd_kind": "union" if entry.kind_flag else "struct"}
    elif kind in (b.FLOAT, b.DATASEC):
        view |= {"size": entry.size}
    else:
        view |= {"type_id": entry.type_id}
    return view


def bpftool_subset(entry: dict[str, Any], view: dict[str, Any]) -> dict[str, Any]:
    """bpftool's entry restricted to the fields of ``view`` (members and values compared field by field)."""
    picked = {k: entry[k] for k in view if k in entry}
    if "values" in picked:  # bpftool 7.1 prints a 32-bit unsigned value past 2^31 sign-extended to 64 bits
        width = 1 << (8 * entry["size"])
        picked["values"] = [dict(v, val=v["val"] % width) for v in picked["values"]]
        view["values"] = [dict(v, val=v["val"] % width) for v in view["values"]]
    for key in ("members", "params", "values"):
        if key in picked:
            picked[key] = [{k: item[k] for k in item if k in ("name", "type_id", "bits_offset", "bitfield_size", "val")}
                           for item in picked[key]]  # fmt: skip
    return picked


@pytest.mark.vm
@pytest.mark.parametrize("generation", GENERATIONS)
def test_parse_agrees_with_bpftool(generation: str, tmp_path: Path) -> None:
    """Every type of the kernel's BTF, parsed, equals what ``bpftool btf dump`` (libbpf) says of it."""
    data = vmlinux_btf(generation)
    path = tmp_path / "vmlinux.btf"
    path.write_bytes(data)
    dump = subprocess.run(["bpftool", "-j", "btf", "dump", "file", path], capture_output=True, text=True, check=True)
    expected = json.loads(dump.stdout)["types"]
    btf = b.Btf(data)
    assert len(btf) == len(expected) + 1  # + void
    differences = []
    for entry in expected:
        view = bpftool_view(btf.type(entry["id"]))
        if bpftool_subset(entry, view) != view:
            differences.append((entry, view))
    assert differences == [], differences[:3]
    named = [e for e in expected if e["kind"] == "STRUCT" and e["name"] == "page"]
    assert btf.ids_named("page") == [e["id"] for e in named]


@pytest.mark.vm
@pytest.mark.parametrize("generation", GENERATIONS)
def test_btf_in_a_dump_is_the_vmlinux_btf(generation: str, captured: Callable[[str, str], truth.Capture]) -> None:
    """What kmeminspect reads between __start_BTF and __stop_BTF of a dump (symbols from the dump's own
    kallsyms) is byte for byte the .BTF section of that build's vmlinux."""
    prog = open_vmcore(captured(generation, "mixed").kdump, None)
    assert types_mode(prog) == "btf"
    assert btf_in_memory(prog) == vmlinux_btf(generation)


def comparable(snapshot: Any) -> dict[str, Any]:
    data = snapshot_mod.to_json(snapshot)
    data.pop("source")
    return data


@pytest.mark.vm
@pytest.mark.parametrize("case", [pytest.param((g, s), id=f"{g}-{s}") for g in GENERATIONS for s in SCENARIOS])
def test_snapshot_in_btf_mode_equals_dwarf(
    case: tuple[str, str], captured: Callable[[str, str], truth.Capture]
) -> None:
    """Without a vmlinux, every scenario reads exactly as with one: the same snapshot (every section, block,
    pagemap, zone, claim and memmap run) and the same audit findings. BTF mode reads the ELF dump, DWARF
    mode the kdump-compressed one (both formats are read in both modes elsewhere in this file)."""
    generation, scenario = case
    capture = captured(generation, scenario)
    info = capture.directory / "vmcoreinfo"
    vmcoreinfo = info if info.is_file() else None
    btf_prog = open_vmcore(capture.elf, None, vmcoreinfo)
    assert types_mode(btf_prog) == "btf"
    with_btf = read_snapshot(btf_prog)
    assert with_btf.source["types"] == "btf"
    with_dwarf = read_snapshot(open_vmcore(capture.kdump, get_kernel(generation).vmlinux, vmcoreinfo))
    assert with_dwarf.source["types"] == "dwarf"
    assert comparable(with_btf) == comparable(with_dwarf)
    assert audit.audit(with_btf) == audit.audit(with_dwarf)


@pytest.mark.vm
@pytest.mark.parametrize("generation", GENERATIONS)
def test_tracer_gets_the_same_offsets(generation: str, captured: Callable[[str, str], truth.Capture]) -> None:
    """The -D constants and argument positions the BPF programs are compiled with are the same from BTF
    (function prototypes, struct offsets) as from DWARF."""
    capture = captured(generation, "mixed")
    programs = [open_vmcore(capture.kdump, None), open_vmcore(capture.kdump, get_kernel(generation).vmlinux)]
    layouts = [read_snapshot(p, pfn_range=(0, 1)).layout for p in programs]
    btf_side, dwarf_side = ((bpf_constants(p, lay), argument_positions(p, PROBED_PARAMETERS)) for p, lay in
                            zip(programs, layouts, strict=True))  # fmt: skip
    assert btf_side == dwarf_side
    assert dwarf_side[1][0]  # some function's arguments were found


def kmem(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmeminspect", *args], capture_output=True, text=True, timeout=600, cwd=REPO
    )


@pytest.mark.vm
@pytest.mark.parametrize("generation", GENERATIONS)
def test_command_line_btf_sources(
    generation: str, captured: Callable[[str, str], truth.Capture], tmp_path: Path
) -> None:
    """The command line: a dump alone reads in BTF mode and says so in the snapshot; every command answers
    as with the vmlinux; ``--btf FILE`` (raw BTF) gives the same; another build's BTF is refused in one
    line (VMCOREINFO's sizes and offsets disagree)."""
    dump = str(captured(generation, "pmem-collision").kdump)
    alone, from_file = tmp_path / "alone.snap", tmp_path / "file.snap"
    assert kmem("--vmcore", dump, "snapshot", "-o", str(alone)).returncode == 0
    assert snapshot_mod.load(alone).source["types"] == "btf"
    vmlinux = str(get_kernel(generation).vmlinux)
    for command in (["sections"], ["blocks"], ["pfn", "0x1000"], ["pfn", "0x40000-0x48000"], ["audit"], ["map"]):
        btf_run = kmem("--vmcore", dump, "--json", *command)
        dwarf_run = kmem("--vmcore", dump, "--vmlinux", vmlinux, "--json", *command)
        assert btf_run.returncode in (0, 1) and btf_run.stderr == "", btf_run.stderr
        assert (btf_run.returncode, btf_run.stdout) == (dwarf_run.returncode, dwarf_run.stdout), command
    own = tmp_path / "own.btf"
    own.write_bytes(vmlinux_btf(generation))
    result = kmem("--vmcore", dump, "--btf", str(own), "snapshot", "-o", str(from_file))
    assert result.returncode == 0, result.stderr
    assert comparable(snapshot_mod.load(alone)) == comparable(snapshot_mod.load(from_file))
    other = next(g for g in GENERATIONS if g != generation)
    foreign = tmp_path / "other.btf"
    foreign.write_bytes(vmlinux_btf(other))
    refused = kmem("--vmcore", dump, "--btf", str(foreign), "sections")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "the BTF does not describe this kernel" in refused.stderr


def test_truncated_or_foreign_btf_is_refused() -> None:
    """A blob cut short, of another byte order, or with a kind this parser does not know raises BtfError."""
    header = (0xEB9F).to_bytes(2, "little") + bytes([1, 0]) + (24).to_bytes(4, "little")
    one_int = (0).to_bytes(4, "little") + (1 << 24).to_bytes(4, "little") + (4).to_bytes(4, "little")
    one_int += (32).to_bytes(4, "little")
    strings = b"\0"
    good = header + b"".join(n.to_bytes(4, "little") for n in (0, len(one_int), len(one_int), 1)) + one_int + strings
    assert b.Btf(good).type(1).int_bits == 32
    with pytest.raises(b.BtfError, match="cut short"):
        b.Btf(good[:-2])
    with pytest.raises(b.BtfError, match="not BTF"):
        b.Btf(good[1::-1] + good[2:])
    unknown = bytearray(good)
    unknown[24 + 7] = 25  # kind 25 in the first type's info
    with pytest.raises(b.BtfError, match="kind 25"):
        b.Btf(bytes(unknown))


@pytest.mark.vm
@pytest.mark.parametrize("generation", GENERATIONS)
def test_bad_btf_is_one_line(generation: str, captured: Callable[[str, str], truth.Capture], tmp_path: Path) -> None:
    """Bad BTF ends in one line and exit 2, saying what is wrong and what to do: the BTF of something else
    (no struct page), a file that is neither BTF nor ELF, a file cut short, a file that is not there, an
    ELF file without .BTF, a dump lacking the pages of its BTF (as a filter or a truncated copy leaves
    it), and a dump whose BTF is not BTF."""
    capture = captured(generation, "mixed")
    truncated = tmp_path / "truncated.btf"
    truncated.write_bytes(vmlinux_btf(generation)[:100_000])
    no_btf_elf = Path(sys.executable).resolve()  # an ELF program: no .BTF section
    prog = open_vmcore(capture.elf, get_kernel(generation).vmlinux)
    start = prog.symbol("__start_BTF").address
    lacking = Injector(capture.elf, tmp_path / "lacking.elf", prog)
    lacking.drop_from_dump(start, 4096)
    garbled = Injector(capture.elf, tmp_path / "garbled.elf", prog)
    garbled.write_u32(start, 0)
    unrelated = tmp_path / "unrelated.btf"  # a BTF of something else (a module's, a BPF object's): no struct page
    unrelated.write_bytes(hand_made_btf([int_type(1)], b"\0x\0"))
    text = tmp_path / "notes.txt"
    text.write_text("not BTF\n")
    cases = {
        "it has no SIZE(page)": (str(capture.kdump), "--btf", str(unrelated)),
        "neither BTF nor an ELF file": (str(capture.kdump), "--btf", str(text)),
        "cut short": (str(capture.kdump), "--btf", str(truncated)),
        "No such file": (str(capture.kdump), "--btf", str(tmp_path / "absent.btf")),
        "without a .BTF section": (str(capture.kdump), "--btf", str(no_btf_elf)),
        "lacks the pages of its BTF": (str(lacking.path),),
        "not BTF (magic 0x0000": (str(garbled.path),),
    }
    for words, (dump, *options) in cases.items():
        result = kmem("--vmcore", dump, *options, "sections")
        assert result.returncode == 2, (words, result.stderr)
        assert result.stderr.count("\n") == 1 and words in result.stderr, (words, result.stderr)
        assert "--vmlinux" in result.stderr or "--btf" in result.stderr, result.stderr


def hand_made_btf(types: list[bytes], strings: bytes) -> bytes:
    """A BTF blob: the header, ``types`` (each a type record with its extra words), ``strings``."""
    body = b"".join(types)
    header = (0xEB9F).to_bytes(2, "little") + bytes([1, 0]) + (24).to_bytes(4, "little")
    header += b"".join(n.to_bytes(4, "little") for n in (0, len(body), len(body), len(strings)))
    return header + body + strings


def int_type(name_offset: int) -> bytes:
    words = (name_offset, 1 << 24, 4, 32)  # INT, 4 bytes, 32 bits, unsigned
    return b"".join(w.to_bytes(4, "little") for w in words)


def test_a_repeated_string_names_every_type_that_uses_either_copy() -> None:
    """pahole writes each string once; a BTF that repeats one still finds every type by its name."""
    strings = b"\0x\0x\0y\0"
    blob = hand_made_btf([int_type(1), int_type(3), int_type(5)], strings)
    btf = b.Btf(blob)
    assert btf.ids_named("x") == [1, 2]
    assert btf.ids_named("y") == [3]
    assert btf.ids_named("z") == []


@pytest.mark.vm
@pytest.mark.parametrize("generation", GENERATIONS)
def test_kallsyms_one_name_at_a_time_equals_drgns(
    generation: str, captured: Callable[[str, str], truth.Capture]
) -> None:
    """kmeminspect's kallsyms (one name decoded at a time, the address encoding checked against
    VMCOREINFO) answers as drgn's loader, which decodes them all: by name for every global the readers
    declare, every probed function and 3,000 other symbols; by address inside 2,000 symbols."""
    prog = drgn.Program()
    prog.set_core_dump(str(captured(generation, "mixed").elf))
    ours = Kallsyms(prog, parse_vmcoreinfo(prog["VMCOREINFO"].string_()))
    theirs = load_vmlinux_kallsyms(prog)
    every = theirs(prog, None, None, False)
    assert ours.count == len(every)
    rng = random.Random(13)
    names = [*DECLARATIONS, *PROBED_PARAMETERS, "__start_BTF", "__stop_BTF", "pfn_to_online_page"]
    names += [s.name for s in rng.sample(every, 3000)]

    def seen(symbols: Sequence[drgn.Symbol]) -> list[tuple[int, drgn.SymbolKind, drgn.SymbolBinding]]:
        return sorted((s.address, s.kind, s.binding) for s in symbols)

    assert [n for n in names if seen(ours(prog, n, None, False)) != seen(theirs(prog, n, None, False))] == []
    starts = collections.Counter(s.address for s in every)
    inside = [s for s in rng.sample(every, 2000) if s.size > 1 and starts[s.address] == 1]
    for symbol in inside:
        address = symbol.address + symbol.size // 2
        assert [s.name for s in ours(prog, None, address, True)] == [symbol.name], symbol


def test_malformed_btf_is_btf_error() -> None:
    """A type section that ends inside a type header, and a name that is not UTF-8, are BtfError (one line
    at the command line), not an IndexError or UnicodeDecodeError."""
    with pytest.raises(b.BtfError, match="ends inside a type"):
        b.Btf(hand_made_btf([(1).to_bytes(4, "little")], b"\0x\0"))
    with pytest.raises(b.BtfError, match="not UTF-8"):
        b.Btf(hand_made_btf([int_type(1)], b"\0\xff\xfe\0")).type(1)


def test_enum_values_before_6_0_are_signed() -> None:
    """Before v6.0 an ENUM's values were signed and kind_flag unused: a BTF without ENUM64 and without a
    flagged ENUM reads -1 as -1; once a flagged ENUM or an ENUM64 exists, an unflagged ENUM is unsigned."""
    words = (1, (b.ENUM << 24) | 1, 4, 3, 0xFFFFFFFF)  # ENUM "E", one value "V" = 0xffffffff
    old_enum = b"".join(w.to_bytes(4, "little") for w in words)
    assert b.Btf(hand_made_btf([old_enum], b"\0E\0V\0")).type(1).enumerators == (("V", -1),)
    flagged = b"".join(w.to_bytes(4, "little") for w in (1, (1 << 31) | (b.ENUM << 24) | 1, 4, 3, 1))
    assert b.Btf(hand_made_btf([old_enum, flagged], b"\0E\0V\0")).type(1).enumerators == (("V", 0xFFFFFFFF),)
