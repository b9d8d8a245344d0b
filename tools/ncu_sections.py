#!/usr/bin/env python3
"""Where a kernel's time goes, by source section, from an Nsight Compute report, without ncu.

Reads a .ncu-rep collected with `--section SourceCounters` (and -lineinfo in the build): the
per-instruction executed counts and PC-sampling stall counts of one profiled kernel, and the
line table (.debug_line) of the cubin embedded in the report. Instructions are attributed to
the source line that the line table gives; instructions of inlined helpers in other files take
the section of the last instruction (in address order) that belongs to the kernel's own file,
i.e. the code that called them. Sections start at the kernel file's `// ---- ` comments and at
any `--section LINE=NAME`.

  tools/ncu_sections.py REPORT --source kernels/decode_attention_lut_mma.cuh \\
      [--kernel DecodeAttentionLutMmaKernelILi128ELNS0_7KvCodecE3] [--tiles N] [--lines 30]

--source is the kernel's file as it was built for the report (same file name: the line table
names files, and lines are matched by the base name).

The report format (a sequence of length-prefixed protocol-buffer messages after an "NVR" header)
is read generically; only the fields this script needs were identified (metric names in a
string table, per-instance values keyed by PC).
"""
import argparse
import bisect
import collections
import re
import struct
import sys


def varint(b, i):
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def parse(b):
    """Protocol-buffer wire format -> [(field, type, value)], or None if b is not a message."""
    i, out = 0, []
    try:
        while i < len(b):
            key, i = varint(b, i)
            f, t = key >> 3, key & 7
            if f == 0:
                return None
            if t == 0:
                v, i = varint(b, i)
            elif t == 1:
                v = struct.unpack_from('<d', b, i)[0]
                i += 8
            elif t == 5:
                v = struct.unpack_from('<f', b, i)[0]
                i += 4
            elif t == 2:
                n, i = varint(b, i)
                if i + n > len(b):
                    return None
                v = b[i:i + n]
                i += n
            else:
                return None
            out.append((f, t, v))
    except (IndexError, struct.error):
        return None
    return out


def blocks(d):
    if d[:3] != b'NVR':
        sys.exit('not an Nsight Compute report (no NVR header)')
    i, out = 8, []
    if d[i] == 0x08:  # a two-byte preamble before the first length
        i += 2
    while i + 4 <= len(d):
        n = struct.unpack_from('<I', d, i)[0]
        i += 4
        out.append(d[i:i + n])
        i += n
    return out


def field(m, f):
    return [v for ff, _, v in m if ff == f]


def uleb(b, i):
    return varint(b, i)


def sleb(b, i):
    r, j = varint(b, i)
    bits = 7 * (j - i)
    return (r - (1 << bits) if r & (1 << (bits - 1)) else r), j


def line_table(elf, function):
    """[(address in function, file, line)] from .debug_line (DWARF 2-4) and its relocations."""
    shoff = struct.unpack_from('<Q', elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', elf, 0x3A)
    secs = []
    for k in range(shnum):
        name, typ, _, _, off, size, link, _, _, _ = struct.unpack_from('<IIQQQQIIQQ', elf, shoff + k * shentsize)
        secs.append(dict(name=name, typ=typ, off=off, size=size, link=link))
    stro = secs[shstrndx]['off']
    for s in secs:
        s['n'] = elf[stro + s['name']:elf.index(b'\0', stro + s['name'])].decode()
    by = {s['n']: s for s in secs}
    symtab = next(s for s in secs if s['typ'] == 2)
    strtab = secs[symtab['link']]
    syms = []
    for k in range(symtab['size'] // 24):
        st_name = struct.unpack_from('<I', elf, symtab['off'] + k * 24)[0]
        syms.append(elf[strtab['off'] + st_name:elf.index(b'\0', strtab['off'] + st_name)].decode())
    rel = by['.rela.debug_line']
    relsym = {}
    for k in range(rel['size'] // 24):
        r_off, r_info, r_add = struct.unpack_from('<QQq', elf, rel['off'] + k * 24)
        relsym[r_off] = (syms[r_info >> 32], r_add)
    dl = by['.debug_line']
    D = elf[dl['off']:dl['off'] + dl['size']]
    rows, i = [], 0
    while i < len(D):
        unit_len = struct.unpack_from('<I', D, i)[0]
        end = i + 4 + unit_len
        ver = struct.unpack_from('<H', D, i + 4)[0]
        hlen = struct.unpack_from('<I', D, i + 6)[0]
        j = i + 10
        prog = j + hlen
        min_inst = D[j]
        j += 2 if ver >= 4 else 1
        j += 1  # default_is_stmt
        line_base = struct.unpack_from('<b', D, j)[0]
        line_range, opbase = D[j + 1], D[j + 2]
        stdlens = list(D[j + 3:j + 3 + opbase - 1])
        j += 3 + opbase - 1
        while D[j] != 0:  # include directories
            j = D.index(b'\0', j) + 1
        j += 1
        files = []
        while D[j] != 0:
            k = D.index(b'\0', j)
            files.append(D[j:k].decode())
            j = k + 1
            for _ in range(3):
                _, j = uleb(D, j)
        j = prog
        addr, fno, line, sym = 0, 1, 1, None

        def emit():
            if sym == function:
                rows.append((addr, files[fno - 1] if 0 < fno <= len(files) else str(fno), line))

        while j < end:
            op = D[j]
            j += 1
            if op >= opbase:
                adj = op - opbase
                addr += (adj // line_range) * min_inst
                line += line_base + adj % line_range
                emit()
            elif op == 0:
                n, j = uleb(D, j)
                sub = D[j]
                if sub == 1:
                    addr, fno, line, sym = 0, 1, 1, None
                elif sub == 2:
                    r = relsym.get(j + 1)
                    sym, addr = (r[0], r[1]) if r else (None, 0)
                j += n
            elif op == 1:
                emit()
            elif op == 2:
                v, j = uleb(D, j)
                addr += v * min_inst
            elif op == 3:
                v, j = sleb(D, j)
                line += v
            elif op == 4:
                fno, j = uleb(D, j)
            elif op == 5 or op == 12:
                _, j = uleb(D, j)
            elif op == 8:
                addr += ((255 - opbase) // line_range) * min_inst
            elif op == 9:
                addr += struct.unpack_from('<H', D, j)[0]
                j += 2
            elif op not in (6, 7, 10, 11):
                for _ in range(stdlens[op - 1]):
                    _, j = uleb(D, j)
        i = end
    return sorted(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('report')
    ap.add_argument('--source', required=True, help="the kernel's source file as it was when profiled")
    ap.add_argument('--kernel', default='', help='substring of the mangled name of the profiled kernel')
    ap.add_argument('--section', action='append', default=[], help='LINE=NAME: an extra section start')
    ap.add_argument('--tiles', type=float, default=0, help='divide instruction counts by this (per tile)')
    ap.add_argument('--lines', type=int, default=20, help='also print this many top source lines')
    a = ap.parse_args()

    d = open(a.report, 'rb').read()
    msgs = [parse(b) for b in blocks(d)]
    names = None  # the metric-name table: a message whose field 4 holds the names as field 1
    for m in msgs:
        for x in field(m, 4) if m else []:
            xm = parse(x)
            cand = field(xm, 1) if xm else []
            if b'inst_executed' in cand and all(isinstance(c, bytes) for c in cand):
                names = [c.decode() for c in cand]
                break
        if names:
            break
    if names is None:
        sys.exit('no metric-name table found')
    results = [m for m in msgs if m and field(m, 5) and field(m, 13) and isinstance(field(m, 5)[0], bytes)]
    results = [m for m in results if a.kernel in field(m, 5)[0].decode()]
    if not results:
        sys.exit(f'no profiled kernel matches {a.kernel!r}')
    res = results[0]
    fn = field(res, 5)[0].decode()
    metrics = {}
    for e in field(res, 13):
        em = parse(e)
        mid = field(em, 1)[0]
        inst = {}
        for x in field(em, 3):
            xm = parse(x)
            if not xm or not field(xm, 1) or not field(xm, 2):
                continue
            k, v = parse(field(xm, 1)[0]), parse(field(xm, 2)[0])
            kk = field(k, 5) if k else []
            vv = field(v, 5) if v else []
            if kk and isinstance(kk[0], int):
                inst[kk[0]] = vv[0] if vv and isinstance(vv[0], int) else 0
        if mid < len(names):
            metrics[names[mid]] = inst
    executed = metrics['inst_executed']
    base = min(executed)
    prefix = 'smsp__pcsamp_warps_issue_stalled_'
    stalls = collections.defaultdict(collections.Counter)
    for name, inst in metrics.items():
        if name.startswith(prefix) and not name.endswith('_not_issued'):
            for pc, v in inst.items():
                if v:
                    stalls[pc - base][name[len(prefix):]] += v

    elf_at = d.find(b'\x7fELF')
    table = line_table(d[elf_at:], fn)
    if not table:
        sys.exit(f'no line table for {fn} (build with -lineinfo)')
    addrs = [t[0] for t in table]

    def where(off):
        k = bisect.bisect_right(addrs, off) - 1
        return (table[k][1], table[k][2]) if k >= 0 else ('?', 0)

    src = open(a.source).read().split('\n')
    src_name = a.source.split('/')[-1]
    starts = [(0, 'before the first section')]
    for n, text in enumerate(src, 1):
        mm = re.search(r'// ---- (.*?)(?: ----)?$', text.strip())
        if mm:
            starts.append((n, mm.group(1)[:60]))
    for s in a.section:
        ln, nm = s.split('=', 1)
        starts.append((int(ln), nm))
    starts.sort()
    lines = [s for s, _ in starts]

    per_sec, inst_sec = collections.defaultdict(collections.Counter), collections.Counter()
    per_line, inst_line = collections.defaultdict(collections.Counter), collections.Counter()
    cur = starts[0][1]
    for off in sorted(set(executed.keys()) - {None} | set(pc + base for pc in stalls)):
        o = off - base
        f, ln = where(o)
        if f.split('/')[-1] == src_name:
            cur = starts[bisect.bisect_right(lines, ln) - 1][1]
        per_sec[cur].update(stalls.get(o, {}))
        inst_sec[cur] += executed.get(off, 0)
        per_line[(f.split('/')[-1], ln)].update(stalls.get(o, {}))
        inst_line[(f.split('/')[-1], ln)] += executed.get(off, 0)
    total = sum(sum(c.values()) for c in per_sec.values())
    reasons = collections.Counter()
    for c in per_sec.values():
        reasons.update(c)
    div = a.tiles if a.tiles > 0 else 1
    unit = 'per tile' if a.tiles > 0 else 'total'
    print(f'{fn}\n{total} stall samples; all: ' +
          ', '.join(f'{r} {v * 100 / total:.1f}%' for r, v in reasons.most_common(8)))
    print(f'\n| section | stall samples | warp instructions {unit} | top stall reasons |\n|---|---|---|---|')
    for k in sorted(per_sec, key=lambda k: -sum(per_sec[k].values())):
        s = sum(per_sec[k].values())
        top = ', '.join(f'{r} {v * 100 // s}%' for r, v in per_sec[k].most_common(3))
        print(f'| {k} | {s * 100 / total:.1f}% | {inst_sec[k] / div:.0f} | {top} |')
    if a.lines:
        print(f'\n| source line | stall samples | warp instructions {unit} | top stall reasons |\n|---|---|---|---|')
        for k in sorted(per_line, key=lambda k: -sum(per_line[k].values()))[:a.lines]:
            s = sum(per_line[k].values())
            top = ', '.join(f'{r} {v * 100 // s}%' for r, v in per_line[k].most_common(3))
            print(f'| {k[0]}:{k[1]} | {s * 100 / total:.1f}% | {inst_line[k] / div:.0f} | {top} |')


if __name__ == '__main__':
    main()
