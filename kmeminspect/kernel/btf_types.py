"""drgn's types, constants, functions and global variables from the kernel's BTF, kallsyms and VMCOREINFO.

Registered through drgn's own finder API, so every reader and drgn helper runs unchanged on top:

- types: every struct, union, enum, typedef and base type of the BTF;
- constants: every enumerator (``PG_reserved``, ``SECTION_MARKED_PRESENT_BIT``, ``MMOP_OFFLINE``...);
- functions: BTF ``FUNC`` records (their prototypes and parameter names) at their kallsyms address;
- variables: BTF has no type for most global variables (only per-cpu ones), so the few the readers and
  drgn's helpers use get the type the kernel declares them with (:data:`DECLARATIONS`), at their kallsyms
  address, each array's length from VMCOREINFO or BTF.

Symbols come from ``/proc/kallsyms`` for the running kernel, else from the kallsyms tables VMCOREINFO points
to (v6.0+), looked up one name at a time (:mod:`.kallsyms`).
Before the readers run, :func:`check_against_vmcoreinfo` compares every ``SIZE()`` and ``OFFSET()`` the
kernel wrote into VMCOREINFO with the BTF: BTF of another build, or one without ``struct page``, is refused
and its finders disabled again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import drgn
from drgn import (
    FindObjectFlags,
    Object,
    Program,
    ProgramFlags,
    Qualifiers,
    Type,
    TypeKind,
    TypeMember,
    TypeParameter,
)
from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms

from ..errors import TargetError
from . import btf as b
from .kallsyms import Kallsyms, KallsymsError

#: drgn's kind of a looked-up type -> the BTF kinds that can answer it
_BTF_KINDS = {
    TypeKind.STRUCT: (b.STRUCT,),
    TypeKind.UNION: (b.UNION,),
    TypeKind.ENUM: (b.ENUM, b.ENUM64),
    TypeKind.TYPEDEF: (b.TYPEDEF,),
    TypeKind.INT: (b.INT,),
    TypeKind.BOOL: (b.INT,),
    TypeKind.FLOAT: (b.FLOAT,),
}
_QUALIFIERS = {b.CONST: Qualifiers.CONST, b.VOLATILE: Qualifiers.VOLATILE, b.RESTRICT: Qualifiers.RESTRICT}
_INT_NAMES = {1: "char", 2: "short", 4: "int", 8: "long"}

#: Global variables and the type the kernel declares each with: (type name, array length or None). A length
#: is a VMCOREINFO LENGTH(), an enumerator (``NR_NODE_STATES``), or a variable read first (``nr_cpu_ids``:
#: no index past it is ever used, and NR_CPUS is in no table). Only what kmeminspect's readers and the drgn
#: helpers they call use; anything else is "not found", as in a kernel built without it.
DECLARATIONS: dict[str, tuple[str, str | None]] = {
    "mem_section": ("struct mem_section **", None),  # mm/sparse.c; see BtfObjects._mem_section_type
    "max_pfn": ("unsigned long", None),  # mm/memblock.c
    "__highest_present_section_nr": ("unsigned long", None),  # mm/sparse.c, v4.13 c4e1be9ec113
    "node_data": ("struct pglist_data *", "LENGTH(node_data)"),  # arch/x86/mm/numa.c [MAX_NUMNODES]
    "node_states": ("nodemask_t", "NR_NODE_STATES"),  # mm/page_alloc.c (mm/mm_init.c since v6.4)
    "nr_node_ids": ("unsigned int", None),
    "nr_cpu_ids": ("unsigned int", None),
    "__per_cpu_offset": ("unsigned long", "nr_cpu_ids"),  # arch/x86/kernel/setup_percpu.c [NR_CPUS]
    "vmemmap_base": ("unsigned long", None),  # arch/x86/kernel/head64.c (KASLR)
    "page_offset_base": ("unsigned long", None),
    "__pgtable_l5_enabled": ("unsigned int", None),
    "init_mm": ("struct mm_struct", None),
    "init_uts_ns": ("struct uts_namespace", None),
    "iomem_resource": ("struct resource", None),
    "memory_blocks": ("struct xarray", None),  # drivers/base/memory.c, v5.10 4fb6eabf1037
    # `static int` until 7.x: the low 32 bits of a wider integer are the same number on x86_64
    "sections_per_block": ("unsigned int", None),
    "memory_subsys": ("struct bus_type", None),
    "pgmap_array": ("struct xarray", None),  # mm/memremap.c, v5.10
    "deferred_pages": ("struct static_key_true", None),  # mm/page_alloc.c (mm/mm_init.c since v6.4)
    "online_page_callback": ("online_page_callback_t", None),  # mm/memory_hotplug.c
    "kexec_image": ("struct kimage *", None),
    "kexec_crash_image": ("struct kimage *", None),
    "slab_caches": ("struct list_head", None),
}


class BtfTypes:
    """The drgn types of one BTF blob, made on demand and kept (members resolved lazily)."""

    def __init__(self, prog: Program, btf: b.Btf) -> None:
        self.prog = prog
        self.btf = btf
        self._types: dict[int, Type] = {}

    def type(self, type_id: int) -> Type:
        """The drgn type of BTF type ``type_id``."""
        made = self._types.get(type_id)
        if made is None:
            made = self._types[type_id] = self._make(type_id)
        return made

    def _make(self, type_id: int) -> Type:
        prog = self.prog
        if type_id == 0:
            return prog.void_type()
        t = self.btf.type(type_id)
        kind = t.kind
        if kind == b.INT:
            if t.int_encoding & b.INT_BOOL:
                return prog.bool_type(t.name or "_Bool", t.size)
            return prog.int_type(t.name or "int", t.size, bool(t.int_encoding & b.INT_SIGNED))
        if kind == b.PTR:
            return prog.pointer_type(self.type(t.type_id))
        if kind == b.ARRAY:
            element, length = t.array
            return prog.array_type(self.type(element), length)
        if kind in (b.STRUCT, b.UNION):
            members = [self._member(m) for m in t.members]
            make = prog.struct_type if kind == b.STRUCT else prog.union_type
            return make(t.name, t.size, members)
        if kind in (b.ENUM, b.ENUM64):
            signed = t.kind_flag or any(value < 0 for _, value in t.enumerators)
            name = _INT_NAMES[t.size] if signed else "unsigned " + _INT_NAMES[t.size]
            compatible = prog.int_type(name, t.size, signed)
            return prog.enum_type(t.name, compatible, [drgn.TypeEnumerator(n, v) for n, v in t.enumerators])
        if kind == b.FWD:
            complete = self.find(t.name or "", (b.UNION,) if t.kind_flag else (b.STRUCT,))
            if complete is not None:
                return complete
            return prog.union_type(t.name) if t.kind_flag else prog.struct_type(t.name)
        if kind == b.TYPEDEF:
            return prog.typedef_type(t.name or "", self.type(t.type_id))
        if kind in _QUALIFIERS:
            target = self.type(t.type_id)
            return target.qualified(target.qualifiers | _QUALIFIERS[kind])
        if kind in (b.TYPE_TAG, b.FUNC, b.VAR):
            return self.type(t.type_id)
        if kind == b.FUNC_PROTO:
            params = list(t.parameters)
            variadic = bool(params) and params[-1] == (None, 0)
            if variadic:
                params.pop()
            return prog.function_type(
                self.type(t.type_id), [TypeParameter(self._lazy(p), name) for name, p in params], variadic
            )
        if kind == b.FLOAT:
            return prog.float_type(t.name or "double", t.size)
        raise b.BtfError(f"BTF type {type_id} (kind {kind}) is not a type")

    def _lazy(self, type_id: int) -> Callable[[], Type]:
        return lambda: self.type(type_id)

    def _member(self, member: b.Member) -> TypeMember:
        bit_size = member.bit_size
        if bit_size is None and self.btf.kind(member.type_id) == b.INT:  # a struct without kind_flag: the
            target = self.btf.type(member.type_id)  # bit field's width is its INT's (btf.h)
            if target.int_bits and target.int_bits != 8 * target.size:
                bit_size = target.int_bits
        if bit_size is None:
            return TypeMember(self._lazy(member.type_id), member.name, member.bit_offset)

        def bit_field() -> Object:
            return Object(self.prog, self.type(member.type_id), bit_field_size=bit_size)

        return TypeMember(bit_field, member.name, member.bit_offset)

    def find(self, name: str, kinds: tuple[int, ...]) -> Type | None:
        """The first complete type called ``name`` of one of the BTF ``kinds``."""
        for type_id in self.btf.ids_named(name):
            if self.btf.kind(type_id) in kinds:
                return self.type(type_id)
        return None

    def find_type(self, prog: Program, kinds: drgn.TypeKindSet, name: str, filename: str | None) -> Type | None:
        """drgn's type finder callback."""
        if filename:
            return None
        for kind in kinds:
            found = self.find(name, _BTF_KINDS.get(kind, ()))
            if found is not None and found.kind == kind:
                return found
        return None


class BtfObjects:
    """drgn's object finder over BTF: enumerators, functions, and the declared global variables."""

    def __init__(self, types: BtfTypes, vmcoreinfo: dict[str, str]) -> None:
        self.types = types
        self.vmcoreinfo = vmcoreinfo

    def find_object(self, prog: Program, name: str, flags: FindObjectFlags, filename: str | None) -> Object | None:
        """drgn's object finder callback."""
        if filename:
            return None
        if flags & FindObjectFlags.CONSTANT:
            enumerator = self.types.btf.enumerator(name)
            if enumerator is not None:
                return Object(prog, self.types.type(enumerator[0]), enumerator[1])
        if flags & FindObjectFlags.FUNCTION:
            function = next((i for i in self.types.btf.ids_named(name) if self.types.btf.kind(i) == b.FUNC), None)
            address = _address(prog, name)
            if function is not None and address is not None:
                return Object(prog, self.types.type(function), address=address)
        if flags & FindObjectFlags.VARIABLE and name in DECLARATIONS:
            address = _address(prog, name)
            if address is not None:
                return Object(prog, self.declared_type(name), address=address)
        return None

    def declared_type(self, name: str) -> Type:
        """The type ``name`` is declared with in the kernel (:data:`DECLARATIONS`)."""
        prog = self.types.prog
        type_name, length_from = DECLARATIONS[name]
        if name == "mem_section":
            return self._mem_section_type()
        base = prog.type(type_name)
        if length_from is None:
            return base
        return prog.array_type(base, self._length(length_from))

    def _length(self, source: str) -> int:
        prog = self.types.prog
        if source.startswith("LENGTH("):
            value = self.vmcoreinfo.get(source)
            if value is None:
                raise LookupError(f"VMCOREINFO has no {source}")
            return int(value)
        return int(prog[source].value_())  # a variable (nr_cpu_ids) or an enumerator (NR_NODE_STATES)

    def _mem_section_type(self) -> Type:
        """``struct mem_section **`` with SPARSEMEM_EXTREME (x86_64 always), else a static
        ``[NR_SECTION_ROOTS][1]`` array: VMCOREINFO's SYMBOL(mem_section) is the pointer's
        value with EXTREME, the array's own address without."""
        prog = self.types.prog
        section = prog.type("struct mem_section")
        symbol = int(self.vmcoreinfo.get("SYMBOL(mem_section)", "0"), 16)
        address = _address(prog, "mem_section")
        if symbol and symbol == address:  # without EXTREME, SECTIONS_PER_ROOT is 1 (include/linux/mmzone.h)
            roots = int(self.vmcoreinfo["LENGTH(mem_section)"])
            return prog.array_type(prog.array_type(section, 1), roots)
        return prog.pointer_type(prog.pointer_type(section))


def _address(prog: Program, name: str) -> int | None:
    try:
        return int(prog.symbol(name).address)
    except LookupError:
        return None


def parse_vmcoreinfo(text: bytes) -> dict[str, str]:
    """VMCOREINFO's ``KEY=value`` lines (``SIZE(page)``, ``OFFSET(page.flags)``, ``SYMBOL(mem_section)``...)."""
    pairs = {}
    for line in text.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            pairs[key] = value
    return pairs


def check_against_vmcoreinfo(prog: Program, vmcoreinfo: dict[str, str]) -> int:
    """Compare every ``SIZE(x)`` and ``OFFSET(x.y)`` of VMCOREINFO with the BTF's types; raise TargetError on
    the first difference (BTF of another build), or when the BTF lacks one of :data:`CORE_FACTS` (a module's
    or a BPF object's BTF); return how many facts agreed. Other names VMCOREINFO gives that the BTF does not
    have (a typedef's size written under another name) are skipped."""
    agreed = 0
    missing_core = []
    for key, value in vmcoreinfo.items():
        have = _btf_fact(prog, key)
        if have is None:
            if key in CORE_FACTS:
                missing_core.append(key)
            continue
        if have != int(value):
            raise TargetError(
                f"the BTF does not describe this kernel: {key} is {value} in its VMCOREINFO, {have} in the BTF "
                "(BTF of another build?): give the kernel's own BTF (--btf) or its vmlinux (--vmlinux)"
            )
        agreed += 1
    if missing_core:
        raise TargetError(
            f"the BTF does not describe this kernel: it has no {min(missing_core, key=CORE_FACTS.index)} (a "
            "module's or a BPF object's "
            "BTF?): give the kernel's own BTF (--btf) or its vmlinux (--vmlinux)"
        )
    return agreed


#: VMCOREINFO facts every kernel's BTF must have and agree with (struct page and the section table)
CORE_FACTS = ("SIZE(page)", "OFFSET(page.flags)", "SIZE(mem_section)", "OFFSET(mem_section.section_mem_map)")


def _btf_fact(prog: Program, key: str) -> int | None:
    """What the BTF says of VMCOREINFO's ``SIZE(x)`` or ``OFFSET(x.y)``; None for another key, or a type or
    member the BTF does not have."""
    size = re.fullmatch(r"SIZE\((\w+)\)", key)
    offset = re.fullmatch(r"OFFSET\((\w+)\.(\w+)\)", key)
    try:
        if size:
            return int(drgn.sizeof(_named(prog, size.group(1))))
        if offset:
            return int(drgn.offsetof(_named(prog, offset.group(1)), offset.group(2)))
    except (LookupError, ValueError, TypeError):
        pass
    return None


def _named(prog: Program, name: str) -> Type:
    for spelling in (f"struct {name}", f"union {name}", name):
        try:
            return prog.type(spelling)
        except LookupError:
            continue
    raise LookupError(name)


def load_kallsyms(prog: Program) -> None:
    """Find symbols in the kernel's own kallsyms: ``/proc/kallsyms`` for the running kernel (drgn's loader),
    else the tables VMCOREINFO points to (v6.0+, f09bddbd8661), one name at a time (:mod:`.kallsyms`; drgn's
    loader, which decodes every name, when the tables are laid out in a way it does not know). Kept when
    the Program already has a ``kallsyms`` finder (a drgn session's earlier attempt). TargetError when the
    kallsyms have no data symbols (CONFIG_KALLSYMS_ALL=n): the readers' variables would read as absent."""
    if "kallsyms" not in prog.registered_symbol_finders():
        try:
            if prog.flags & ProgramFlags.IS_LOCAL:
                finder: Callable[[Program, str | None, int | None, bool], Sequence[drgn.Symbol]] = (
                    load_vmlinux_kallsyms(prog)
                )
            else:
                try:
                    finder = Kallsyms(prog, parse_vmcoreinfo(prog["VMCOREINFO"].string_()))
                except KallsymsError:
                    finder = load_vmlinux_kallsyms(prog)
            prog.register_symbol_finder("kallsyms", finder, enable_index=0)
        except (LookupError, ValueError, OSError, drgn.FaultError) as error:
            raise TargetError(
                f"cannot read the kernel's kallsyms ({error}): give the kernel's vmlinux (--vmlinux)"
            ) from None
    if _address(prog, "init_mm") is None:
        raise TargetError(
            "the kernel's kallsyms have no data symbols (CONFIG_KALLSYMS_ALL=n?): give the kernel's vmlinux (--vmlinux)"
        )


def btf_in_memory(prog: Program) -> bytes:
    """The kernel's BTF as it lies in its memory, between ``__start_BTF`` and ``__stop_BTF`` (needs
    :func:`load_kallsyms`); raise LookupError when the kernel has none, FaultError when a dump lacks it."""
    start = prog.symbol("__start_BTF").address
    stop = prog.symbol("__stop_BTF").address
    if not 0 < stop - start < 1 << 30:
        raise LookupError(f"__start_BTF {start:#x} and __stop_BTF {stop:#x} do not bound a BTF section")
    return bytes(prog.read(start, stop - start))


def use_btf(prog: Program, btf: b.Btf) -> int:
    """Make ``prog`` find its types, constants, functions and globals in ``btf`` (symbols: see
    :func:`load_kallsyms`); return how many VMCOREINFO facts the BTF agreed with (see
    :func:`check_against_vmcoreinfo`). A BTF that disagrees is refused and its finders disabled again, so
    that a drgn session keeps finding what it found before."""
    vmcoreinfo = parse_vmcoreinfo(prog["VMCOREINFO"].string_())
    types = BtfTypes(prog, btf)
    prog.register_type_finder("btf", types.find_type, enable_index=-1)
    prog.register_object_finder("btf", BtfObjects(types, vmcoreinfo).find_object, enable_index=-1)
    try:
        return check_against_vmcoreinfo(prog, vmcoreinfo)
    except (TargetError, b.BtfError):
        prog.set_enabled_type_finders([n for n in prog.enabled_type_finders() if n != "btf"])
        prog.set_enabled_object_finders([n for n in prog.enabled_object_finders() if n != "btf"])
        raise
