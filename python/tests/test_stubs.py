"""The type stubs name what the extension really has, and the package ships them."""

import ast
from pathlib import Path

import kvshelf
from kvshelf import _native

STUBS = Path(kvshelf.__file__).with_name("_native.pyi")


def test_stubs_and_py_typed_are_installed():
    assert STUBS.exists()
    assert STUBS.with_name("py.typed").exists()


def test_every_stubbed_name_and_method_exists():
    tree = ast.parse(STUBS.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(_native, node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__init__":
                    assert hasattr(cls, item.name), f"{node.name}.{item.name}"
        elif isinstance(node, ast.FunctionDef):
            assert callable(getattr(_native, node.name)), node.name
