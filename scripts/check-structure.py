#!/usr/bin/env python3
"""The shape rules of the tree, checked: no function over 80 lines and no file over 600
lines in library code (tests exempt), and no import circle between the files of a crate.

Usage: scripts/check-structure.py   (from anywhere; exits 1 and lists what breaks a rule)

Functions are measured from their `fn` line to their closing brace. Imports are every
`crate::`/`super::` path a file names (in `use` items and in code), resolved to the file
that defines the module; names re-exported by a crate root (`pub use`, the passes
registry) resolve to the file that defines them. Crate roots and `mod.rs` files only
declare and re-export, so they are not part of any circle.
"""
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
CRATES = {  # crate -> its root file
    "upmix": "src/lib.rs",
    "upmix-ir": "ir/src/lib.rs",
    "upmix-formats": "formats/src/lib.rs",
    "upmix-frontend": "frontend/src/lib.rs",
    "upmix-passes": "passes/src/lib.rs",
    "upmix-emit": "emit/src/lib.rs",
    "upmix-backends": "backends/src/lib.rs",
}
MAX_FN, MAX_FILE = 80, 600


def strip(text):
    """Source without comments and string contents (so braces in them do not count)."""
    text = re.sub(r"'(?:\\u\{[0-9a-fA-F]+\}|\\.|[^'\\\n])'", "' '", text)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'(?<!\w)r(#*)"(?:.|\n)*?"\1', '""', text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def in_tests(path):
    return "/tests/" in path or path.endswith("/tests.rs")


def long_functions(path, text):
    """(line, name, length) of functions over MAX_FN lines, outside `#[cfg(test)]` modules."""
    src = strip(text)
    test_mod = src.find("#[cfg(test)]")
    out = []
    for m in re.finditer(r"\bfn\s+(\w+)[^;{]*\{", src):
        if test_mod != -1 and m.start() > test_mod:
            break
        depth, i = 1, m.end()
        while depth and i < len(src):
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
        first = src.count("\n", 0, m.start()) + 1
        length = src.count("\n", m.start(), i) + 1
        if length > MAX_FN:
            out.append((first, m.group(1), length))
    return out


def modules(root):
    """Module path (tuple) -> file, from `mod` items (with `#[path]`) and the passes
    registry's lines, starting at a crate root."""
    found = {(): root}
    todo = [((), root)]
    while todo:
        path, file = todo.pop()
        text = open(os.path.join(ROOT, file)).read()
        base = os.path.dirname(file)
        own_dir = os.path.basename(file) in ("lib.rs", "main.rs", "mod.rs")
        child_dir = base if own_dir else os.path.join(base, os.path.basename(file)[:-3])
        for m in re.finditer(r'(?:#\[path = "([^"]+)"\]\s*)?(?:pub(?:\([^)]*\))? )?mod (\w+);', text):
            rel, name = m.group(1), m.group(2)
            if rel:
                child = os.path.normpath(os.path.join(base, rel))
            else:
                child = os.path.join(child_dir, name + ".rs")
                if not os.path.exists(os.path.join(ROOT, child)):
                    child = os.path.join(child_dir, name, "mod.rs")
            found[path + (name,)] = child
            todo.append((path + (name,), child))
        for m in re.finditer(r'^\s*"([^"]+)" (\w+)::\w+ =>', text, re.M):
            found[path + (m.group(2),)] = os.path.normpath(os.path.join(base, m.group(1)))
    return found


def reexports(root_text):
    """Names a crate root re-exports -> the module they come from."""
    out = {}
    for m in re.finditer(r"pub use (\w+)::(\{[^}]*\}|\w+);", root_text):
        for name in re.findall(r"\w+", m.group(2)):
            out[name] = m.group(1)
    for m in re.finditer(r'^\s*"[^"]+" (\w+)::(\w+) =>', root_text, re.M):
        out[m.group(2)] = m.group(1)
    return out


def references(text):
    """Every `crate::a::b` / `super::a` path a file names, grouped `use` lists expanded."""
    src = strip(text)
    paths = []
    for m in re.finditer(r"(?<!\$)\b(crate|super)::((?:\w+::)*)\{([^}]*)\}", src):
        for item in m.group(3).split(","):
            paths.append((m.group(1), (m.group(2) + item.strip()).split("::")))
    for m in re.finditer(r"(?<!\$)\b(crate|super)::(\w+(?:::\w+)*)", src):
        paths.append((m.group(1), m.group(2).split("::")))
    return paths


def import_graph(root):
    mods = modules(root)
    by_file = {f: p for p, f in mods.items()}
    roots = {f for f in mods.values() if os.path.basename(f) in ("lib.rs", "main.rs", "mod.rs")}
    exported = reexports(open(os.path.join(ROOT, root)).read())
    edges = {}
    for path, file in mods.items():
        if file in roots:
            continue
        for kind, parts in references(open(os.path.join(ROOT, file)).read()):
            start = () if kind == "crate" else path[:-1]
            parts = [p for p in parts if p and p != "self"]
            if kind == "crate" and parts and parts[0] in exported and (parts[0],) not in mods:
                parts = [exported[parts[0]]] + parts
            target = None
            for n in range(len(parts), 0, -1):
                if start + tuple(parts[:n]) in mods:
                    target = mods[start + tuple(parts[:n])]
                    break
            if target and target != file and target not in roots:
                edges.setdefault(file, set()).add(target)
    return edges


def circles(edges):
    """Strongly connected components of more than one file (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def main():
    problems = []
    for crate, root in CRATES.items():
        for path, file in modules(root).items():
            text = open(os.path.join(ROOT, file)).read()
            if in_tests(file):
                continue
            lines = text.count("\n")
            if lines > MAX_FILE:
                problems.append(f"{file}: {lines} lines (over {MAX_FILE})")
            for line, name, length in long_functions(file, text):
                problems.append(f"{file}:{line}: fn {name} has {length} lines (over {MAX_FN})")
        for scc in circles(import_graph(root)):
            problems.append(f"{crate}: import circle between {', '.join(scc)}")
    main_rs = "src/main.rs"
    for line, name, length in long_functions(main_rs, open(os.path.join(ROOT, main_rs)).read()):
        problems.append(f"{main_rs}:{line}: fn {name} has {length} lines (over {MAX_FN})")
    for p in problems:
        print(p)
    checked = ", ".join(CRATES)
    print(f"structure: {len(problems)} problems in {checked}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
