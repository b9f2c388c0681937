#!/usr/bin/env python3
"""Measures of the crate's source, for comparing two versions of it.

    python3 scripts/code_measures.py [--check] [SRC]   # SRC defaults to ./src

Prints, for the library's source outside its tests:
- lines, and the longest files;
- the longest functions (from `fn` to the brace that closes it, as rustfmt
  lays them out);
- public items: `pub` declarations not restricted to the crate, and the
  methods of public traits;
- the module graph drawn from `crate::` paths (submodules of `classifier`
  and `reqwest` count as their parent), and the arrows that run back up:
  the edges that lie on a cycle, which no order of the modules can make
  all point one way.

With `--check` it also fails (exit 1) where the layout's limits are passed:
a file over 500 lines outside its tests, a function over 80, the response
future's `poll` at 60 or more, an arrow on a cycle, or a decision in
`policy/` that names the inner service (`Service`).
"""

import os
import re
import sys
from collections import defaultdict

ARGS = [a for a in sys.argv[1:] if a != "--check"]
CHECK = "--check" in sys.argv[1:]
SRC = ARGS[0] if ARGS else "src"


def non_test_lines(text):
    """The lines of a file up to its first `#[cfg(test)]` module."""
    lines = text.split("\n")
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == "#[cfg(test)]" and i + 1 < len(lines):
            nxt = lines[i + 1].strip()
            if re.match(r"(pub\(crate\) )?mod \w+ \{", nxt):
                # Skip the module: to the line that closes it at its indent.
                indent = lines[i + 1][: len(lines[i + 1]) - len(lines[i + 1].lstrip())]
                j = i + 2
                while j < len(lines) and lines[j] != indent + "}":
                    j += 1
                i = j + 1
                continue
            if re.match(r"mod \w+;", nxt):
                i += 2
                continue
        out.append(line)
        i += 1
    while out and out[-1] == "":
        out.pop()
    return out


def files():
    for root, _, names in os.walk(SRC):
        for name in sorted(names):
            if name.endswith(".rs") and not name.endswith("_tests.rs"):
                yield os.path.join(root, name)


def module_of(path):
    rel = os.path.relpath(path, SRC)[: -len(".rs")]
    parts = rel.split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts == ["lib"]:
        return "lib"
    return parts[0]


FN = re.compile(r"^(\s*)(pub(\([a-z]+\))? )?(const )?(async )?(unsafe )?fn (\w+)")
PUB = re.compile(r"^\s*pub (fn|struct|enum|trait|type|const|static|mod|use) ")


def main():
    total = 0
    sizes = []
    functions = []
    public = 0
    edges = defaultdict(set)
    for path in files():
        with open(path) as f:
            lines = non_test_lines(f.read())
        total += len(lines)
        sizes.append((len(lines), os.path.relpath(path, SRC)))
        module = module_of(path)
        in_pub_trait = None
        for n, line in enumerate(lines):
            if PUB.match(line):
                public += 1
            trait = re.match(r"^(\s*)pub trait ", line)
            if trait:
                in_pub_trait = trait.group(1) + "}"
            elif in_pub_trait is not None:
                if line == in_pub_trait:
                    in_pub_trait = None
                elif re.match(r"^\s+fn \w+", line):
                    public += 1
            m = FN.match(line)
            if m:
                indent = m.group(1)
                end = n
                # A declaration without a body ends with `;`.
                while end < len(lines) and not lines[end].rstrip().endswith(("{", ";")):
                    end += 1
                if end < len(lines) and lines[end].rstrip().endswith(";"):
                    continue
                close = end
                while close < len(lines) and lines[close] != indent + "}":
                    if close > end and lines[close].startswith(indent + "}") and lines[close].strip() == "}":
                        break
                    close += 1
                if close == end and lines[end].rstrip().endswith("}"):
                    close = end
                functions.append((close - n + 1, f"{os.path.relpath(path, SRC)}:{n + 1} {m.group(7)}"))
            # Imports and paths in code; a doc link is not an arrow.
            if not line.lstrip().startswith("//"):
                for target in re.findall(r"\bcrate::(\w+)", line):
                    edges[module].add(target)
    modules = {module_of(p) for p in files()}
    graph = {m: {t for t in edges[m] if t in modules and t != m and t != "lib"} for m in modules}
    # Arrows into `lib` are the crate root's re-exports (`crate::BoxError`):
    # they are resolved to the module that defines the item where possible.
    reexports = {}
    with open(os.path.join(SRC, "lib.rs")) as f:
        for m in re.finditer(r"pub use (\w+)::\{?([\w, ]+)\}?;", f.read()):
            for item in m.group(2).split(","):
                reexports[item.strip()] = m.group(1)
    for path in files():
        module = module_of(path)
        with open(path) as f:
            code = [l for l in non_test_lines(f.read()) if not l.lstrip().startswith("//")]
            text = "\n".join(code)
        for group in re.findall(r"use crate::\{([^}]*)\}", text):
            for item in re.split(r"[,\s]+", group):
                if item in reexports and reexports[item] != module:
                    graph[module].add(reexports[item])
        for item in re.findall(r"\bcrate::([A-Z]\w+)", text):
            if item in reexports and reexports[item] != module:
                graph[module].add(reexports[item])
    graph.pop("lib", None)
    for m in graph:
        graph[m].discard("lib")
    # Strongly connected components (Tarjan).
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    comp_of = {v: i for i, c in enumerate(comps) for v in c}
    cyclic = [(a, b) for a in sorted(graph) for b in sorted(graph[a]) if comp_of[a] == comp_of[b]]
    arrows = sum(len(t) for t in graph.values())

    print(f"lines in {SRC}/ outside tests: {total}")
    sizes.sort(reverse=True)
    print("longest files: " + ", ".join(f"{p} {n}" for n, p in sizes[:4]))
    functions.sort(reverse=True)
    print("longest functions: " + ", ".join(f"{p} ({n} lines)" for n, p in functions[:4]))
    print(f"public items (pub declarations and public trait methods): {public}")
    print(f"modules: {len(graph)}, arrows between them: {arrows}")
    print(f"arrows on a cycle (some must run back up): {len(cyclic)}")
    for comp in comps:
        if len(comp) > 1:
            print("  cycle among: " + ", ".join(sorted(comp)))
    for a, b in cyclic:
        print(f"  {a} -> {b}")
    if CHECK:
        failures = [f"{p}: {n} lines" for n, p in sizes if n > 500]
        failures += [f"{p}: {n} lines" for n, p in functions if n > 80]
        failures += [f"{p}: {n} lines" for n, p in functions if p.startswith("future.rs:") and p.endswith(" poll") and n >= 60]
        failures += [f"{a} -> {b} is on a cycle" for a, b in cyclic]
        for path in files():
            if os.path.relpath(path, SRC).startswith("policy" + os.sep):
                with open(path) as f:
                    if "Service" in "\n".join(non_test_lines(f.read())):
                        failures.append(f"{path}: a decision names the inner service")
        for failure in failures:
            print("over the limit: " + failure)
        if failures:
            sys.exit(1)


main()
