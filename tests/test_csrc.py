"""The native engine's sources (src/bibert/csrc): laid out as runtime, drivers and ISA files, every
exported function declared in bitkernels.h and nothing else exported, and one dispatch point:
selecting a kernel family selects the kernel of every op."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bibert.packed import kernels

CSRC = Path(kernels.__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(CSRC.glob("*.c")) + sorted(CSRC.glob("isa/*.c"))
DRIVERS = ["pack.c", "linear.c", "layernorm.c", "embed.c", "attention.c", "kbit.c", "encoder.c"]
cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def code_of(path: Path) -> str:
    """The C code of a file without its comments."""
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", path.read_text(), flags=re.S)


def test_the_layout():
    """The runtime, one driver per op family and one file per ISA; no file over 800 lines."""
    names = {str(p.relative_to(CSRC)) for p in SOURCES}
    assert names == {"runtime.c", *DRIVERS, "isa/portable.c", "isa/avx2.c", "isa/avx512.c",
                     "isa/avx512_attention.c"}
    for path in SOURCES + sorted(CSRC.glob("**/*.h")):
        assert len(path.read_text().splitlines()) <= 800, path.name


def test_only_the_runtime_and_the_isa_files_know_the_cpu():
    """The drivers never name an ISA, test a CPU feature or read the kernel family: they reach
    every kernel through the active ops table. CPU features are read in runtime.c alone, and
    target attributes appear in the ISA files alone."""
    isa_words = re.compile(r"avx|sse\d|popcnt|neon|immintrin|_mm\d*_|__m\d+|__builtin_cpu|target\(|bb_get_kernel|"
                           r"BB_KERNEL_(PORTABLE|AVX2|AVX512)|BB_X86", re.I)
    for name in DRIVERS:
        found = isa_words.findall(code_of(CSRC / name))
        assert not found, f"{name} names {found}"
    for path in SOURCES:
        code = code_of(path)
        if path.name != "runtime.c":
            assert "__builtin_cpu_supports" not in code, path.name
        if path.parent.name != "isa":
            assert "target(" not in code, path.name
    for name in DRIVERS:  # each driver takes the active table
        assert "bb_ops_active()" in code_of(CSRC / name), name


@cc
def test_every_source_declares_what_it_exports():
    """Each C file compiles with -Wmissing-prototypes as an error (a function it does not keep
    static is declared in bitkernels.h or an internal header), and includes only the project's
    headers by their paths."""
    for path in SOURCES:
        proc = subprocess.run(["cc", "-std=gnu11", "-fsyntax-only", "-Wall", "-Wmissing-prototypes", "-Werror",
                               str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for header in re.findall(r'#include "([^"]+)"', path.read_text()):
            assert (path.parent / header).resolve().parent in (CSRC, CSRC / "isa"), (path.name, header)


@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm")
def test_library_exports_exactly_the_header():
    """The loaded library's exported functions are bitkernels.h's: the internal ones are hidden."""
    header = code_of(CSRC / "bitkernels.h")
    declared = set(re.findall(r"^(?:int64_t|int|void)\s+(bb_\w+)\(", header, flags=re.M))
    assert len(declared) > 20
    proc = subprocess.run(["nm", "-D", "--defined-only", str(kernels._library_path())], capture_output=True,
                          text=True, check=True)
    exported = {line.split()[-1] for line in proc.stdout.splitlines() if line.split()[1] in "TtWi"}
    exported = {name for name in exported if not name.startswith("_")}  # _init, _fini
    assert exported == declared


OPS = ["pack.row", "linear.block[BB_OUT_BITS]", "linear.block[BB_OUT_FLOAT]", "linear.block[BB_OUT_KBIT]",
       "layernorm.rows", "embed.row", "attention.transpose64", "attention.scores", "attention.context",
       "attention.row_d64", "kbit.row_sum", "kbit.row_deviation", "kbit.pack_row", "kbit.gelu", "kbit.attention_head",
       "kbit.softmax_head"]

# For each family selected with bb_set_kernel: the table that is active, and for each op the first
# table (portable first) that holds the same kernel, i.e. which family's code runs it.
HARNESS = r"""
#include <stdio.h>
#include "bb_internal.h"

static const bb_ops *tables[] = {
    &bb_ops_portable,
#if BB_X86
    &bb_ops_portable_popcnt, &bb_ops_avx2, &bb_ops_avx512, &bb_ops_avx512_vnni,
#endif
};
#define N_TABLES (int)(sizeof tables / sizeof tables[0])
#define OWNER(op)                                                                        \
    do {                                                                                 \
        const char *owner = "none";                                                      \
        for (int i = N_TABLES - 1; i >= 0; i--)                                          \
            if (active->op && (void (*)(void))tables[i]->op == (void (*)(void))active->op) \
                owner = tables[i]->name;                                                 \
        printf(" %s=%s", #op, owner);                                                    \
    } while (0)

int main(void) {
    for (int family = BB_KERNEL_PORTABLE; family < BB_FAMILIES; family++) {
        if (bb_set_kernel(family) != family) continue;
        const bb_ops *active = bb_ops_active();
        printf("%d %d %s", family, bb_get_kernel(), active->name);
        OPS
        printf("\n");
    }
    return 0;
}
"""


@cc
def test_selecting_a_family_selects_every_op(tmp_path):
    """bb_set_kernel makes one table active (the family's), and each op of that table runs the
    family's own kernel or a portable one, never another family's: with portable selected,
    GELU (which used to pick its variant from the CPU on its own) runs the portable code."""
    harness = tmp_path / "harness.c"
    harness.write_text(HARNESS.replace("OPS", " ".join(f"OWNER({op});" for op in OPS)))
    exe = tmp_path / "harness"
    subprocess.run(["cc", "-std=gnu11", "-O0", "-pthread", f"-I{CSRC}", "-o", str(exe), str(harness),
                    *map(str, SOURCES), "-lm"], check=True, capture_output=True, text=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    report = {}
    for line in lines:
        family, active_family, table, *owners = line.split()
        assert family == active_family
        report[kernels.KERNEL_NAMES[int(family)]] = (table, dict(o.split("=") for o in owners))
    assert set(report) == set(kernels.available_kernels())
    portable = {"portable", "portable-popcnt"}
    for family, (table, owners) in report.items():
        assert set(owners) == set(OPS)
        if family == "portable":
            assert table in portable
            assert set(owners.values()) <= portable | {"none"}
            assert owners["attention.row_d64"] == "none"
        else:
            variants = {family, family + "-vnni"}  # AVX-512 on a CPU with VNNI: its own attention table
            assert table in variants
            assert set(owners.values()) <= portable | variants | {"none"}
            assert owners["kbit.gelu"] == family  # the family's own GELU, not the portable one
            assert all(owners[op] == family for op in OPS if op.startswith("linear."))
    if "avx512" in report:  # AVX-512 has a kernel of its own for every op
        assert set(report["avx512"][1].values()) <= {"avx512", "avx512-vnni"}
