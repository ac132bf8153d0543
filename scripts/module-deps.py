#!/usr/bin/env python3
"""Reports import cycles between the modules of the tessera crate.

A module is a top-level module (`src/raftstore`, `src/server`, ...) or a module one level
below it (`raftstore::peer`, `server::split`). For every source file the script collects the
modules it names through `crate::a::b`, `super::b` or `use super::{b, c}`, and prints every
cycle among modules of one parent and among top-level modules. Exit status 1 if there is
one. Run from the repository root: scripts/module-deps.py [--graph]
"""

import os
import re
import sys
from collections import defaultdict

SRC = "src"


def module_of(path):
    """('raftstore', 'peer') for src/raftstore/peer.rs or src/raftstore/peer/x.rs."""
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return tuple(rel[:2])


def strip_comments_and_tests(text):
    text = re.sub(r"//[^\n]*", "", text)
    # Unit tests may reach anywhere; they are not part of the module graph.
    cut = re.search(r"#\[cfg\(test\)\]\s*mod tests", text)
    return text[: cut.start()] if cut else text


def names_after(prefix_re, text):
    """Module names that follow `prefix`: `prefix::name` or `prefix::{a, b::c}`."""
    out = set()
    for m in re.finditer(prefix_re + r"::(\{[^;]*?\}|[A-Za-z_][A-Za-z0-9_]*)", text):
        item = m.group(1)
        if item.startswith("{"):
            for part in re.split(r",", item[1:-1]):
                part = part.strip()
                if part:
                    out.add(re.split(r"::|\s", part)[0])
        else:
            out.add(item)
    return out


def deps():
    edges = defaultdict(set)
    modules = set()
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            me = module_of(path)
            if not me or me[0] in ("main", "cli"):
                continue
            modules.add(me)
            text = strip_comments_and_tests(open(path, encoding="utf-8").read())
            # crate::a::b
            for m in re.finditer(r"crate::([a-z_]+)(?:::([a-z_]+))?", text):
                edges[me].add((m.group(1),) + ((m.group(2),) if m.group(2) else ()))
            # super:: from a top-level module's child file = a sibling of the same parent
            depth = len(os.path.relpath(path, SRC).split(os.sep))
            is_mod_file = f in ("mod.rs",)
            if len(me) == 2:
                # In src/a/b.rs, super:: is `a`; in src/a/b/c.rs, super::super:: is `a`.
                parent_ref = r"super" if depth == 2 and not is_mod_file else r"super::super"
                for n in names_after(r"(?<![:\w])" + parent_ref, text):
                    edges[me].add((me[0], n))
    return modules, edges


def normalize(target, modules):
    if target in modules:
        return target
    if target[:1] in modules:
        return target[:1]
    return None


def cycles(nodes, graph):
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main():
    modules, edges = deps()
    modules |= {m[:1] for m in modules}
    top = defaultdict(set)
    within = defaultdict(lambda: defaultdict(set))
    for src, targets in edges.items():
        for t in targets:
            t = normalize(t, modules)
            if t is None or t == src:
                continue
            if src[0] != t[0]:
                top[(src[0],)].add((t[0],))
            elif len(src) == 2 and len(t) == 2:
                within[src[0]][src].add(t)
    if "--graph" in sys.argv:
        for s in sorted(top):
            print("::".join(s), "->", ", ".join(sorted("::".join(t) for t in top[s])))
        for p in sorted(within):
            for s in sorted(within[p]):
                print("::".join(s), "->", ", ".join(sorted("::".join(t) for t in within[p][s])))
    found = cycles({(m[0],) for m in modules}, top)
    for p, g in within.items():
        found += cycles(set(g) | {t for ts in g.values() for t in ts}, g)
    for c in found:
        print("cycle:", " <-> ".join("::".join(m) for m in c))
    if found:
        sys.exit(1)
    print("no import cycles between modules")


if __name__ == "__main__":
    main()
