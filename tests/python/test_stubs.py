"""The type stubs (saecpp/__init__.pyi) name every argument of the compiled functions, in their
order: a binding that grows an argument without its stub fails here."""

import ast
import pathlib
import re

import saecpp


def stub_functions():
    tree = ast.parse((pathlib.Path(saecpp.__file__).parent / "__init__.pyi").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node.name, None, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    yield item.name, node.name, item


def compiled_arguments(fn):
    """Argument names from pybind11's signature line (the first of each overload)."""
    line = fn.__doc__.splitlines()[0]
    inside = line[line.index("(") + 1:line.rindex(")")]
    return [a for a in re.findall(r"(?:^|, )(\w+):", inside) if a != "self"]


def test_stubs_name_every_argument_in_order():
    checked = 0
    for name, cls, node in stub_functions():
        owner = getattr(saecpp, cls) if cls else saecpp
        fn = getattr(owner, name, None)
        if fn is None or not (fn.__doc__ or "").startswith(name + "("):
            continue  # properties, Python-level helpers
        stub = [a.arg for a in node.args.args if a.arg != "self"]
        assert stub == compiled_arguments(fn), f"{cls + '.' if cls else ''}{name}"
        checked += 1
    assert checked >= 10
